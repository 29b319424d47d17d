"""What a person's browser keeps on the platform: login sessions and the ComfyUI frontend's
user data (settings, saved workflows), per tenant, in the database every replica shares."""

from zimage_platform.browser.sessions import BrowserSessionRow, SessionStore
from zimage_platform.browser.userdata import (
    UserDataStore,
    UserFileExists,
    UserFileRow,
    UserPathRefused,
    UserQuotaExceeded,
    clean_path,
)

__all__ = [
    "BrowserSessionRow",
    "SessionStore",
    "UserDataStore",
    "UserFileExists",
    "UserFileRow",
    "UserPathRefused",
    "UserQuotaExceeded",
    "clean_path",
]
