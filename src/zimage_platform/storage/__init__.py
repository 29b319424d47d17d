"""Object storage: results in S3 and the embedded SeaweedFS server."""

from zimage_platform.storage.seaweedfs import SeaweedFS

__all__ = ["SeaweedFS"]
