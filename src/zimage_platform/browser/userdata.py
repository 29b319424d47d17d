"""The ComfyUI frontend's user data per tenant: settings (``comfy.settings.json``), saved
workflows (``workflows/*.json``), keybindings, templates... as ComfyUI keeps them under
``user/default/``, but in the shared database, so every replica and every browser of a tenant
sees the same files.

Paths are relative, ``/``-separated and checked before they reach a query (no ``..``, no
absolute paths, no backslashes or control characters); sizes are capped per file and per
tenant (count and bytes), so one tenant cannot fill the database.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, Index, Integer, LargeBinary, String, delete, func, or_, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from zimage_platform.db import session_factory, utcnow
from zimage_platform.db.base import Base, UTCDateTime
from zimage_platform.errors import PlatformError

MAX_PATH = 512
MAX_SEGMENT = 255


class UserFileRow(Base):
    __tablename__ = "browser_userdata"
    __table_args__ = (Index("ix_browser_userdata_tenant_modified", "tenant_id", "modified_at"),)

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Relative to the tenant's user folder, ``/``-separated (``workflows/portrait.json``).
    path: Mapped[str] = mapped_column(String(MAX_PATH), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    modified_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UserPathRefused(PlatformError):
    code = "invalid_path"
    status = 403


class UserFileExists(PlatformError):
    code = "file_exists"
    status = 409


class UserQuotaExceeded(PlatformError):
    code = "userdata_quota_exceeded"
    status = 413


def clean_path(raw: str, what: str = "file") -> str:
    """A safe relative path, or :class:`UserPathRefused` (ComfyUI answers 403 for paths that
    leave the user folder)."""
    path = raw.strip()
    bad = (
        not path
        or len(path) > MAX_PATH
        or path.startswith("/")
        or "\\" in path
        or any(ord(c) < 32 or ord(c) == 127 for c in path)
    )
    parts = path.split("/")
    if bad or any(p in ("", ".", "..") or len(p) > MAX_SEGMENT for p in parts):
        raise UserPathRefused(
            f"{what} must be a relative path inside the user folder (no '..', '\\' or empty parts, "
            f"at most {MAX_PATH} characters)",
            param=what,
        )
    return path


class UserDataStore:
    def __init__(self, engine: Engine, *, max_file_bytes: int, max_total_bytes: int, max_files: int) -> None:
        self._sessions = session_factory(engine)
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self.max_files = max_files

    def has_any(self, tenant_id: str) -> bool:
        with self._sessions() as s:
            return s.scalar(select(UserFileRow.path).where(UserFileRow.tenant_id == tenant_id).limit(1)) is not None

    def list(self, tenant_id: str, directory: str, *, recurse: bool) -> list[UserFileRow] | None:
        """Files under ``directory`` (direct children unless ``recurse``), without their bytes;
        None when the folder does not exist (no file under it)."""
        prefix = clean_path(directory.strip("/"), "dir") + "/"
        with self._sessions() as s:
            rows = s.execute(
                select(UserFileRow.path, UserFileRow.size, UserFileRow.created_at, UserFileRow.modified_at)
                .where(UserFileRow.tenant_id == tenant_id, UserFileRow.path.startswith(prefix, autoescape=True))
                .order_by(UserFileRow.path)
            ).all()
        if not rows:
            return None
        found = [
            UserFileRow(tenant_id=tenant_id, path=path, size=size, created_at=created, modified_at=modified)
            for path, size, created, modified in rows
        ]
        return found if recurse else [r for r in found if "/" not in r.path[len(prefix) :]]

    def read(self, tenant_id: str, path: str) -> UserFileRow | None:
        with self._sessions() as s:
            return s.get(UserFileRow, (tenant_id, clean_path(path)))

    def write(self, tenant_id: str, path: str, data: bytes, *, overwrite: bool = True) -> UserFileRow:
        path = clean_path(path)
        if len(data) > self.max_file_bytes:
            raise UserQuotaExceeded(
                f"a user file is limited to {self.max_file_bytes} bytes (this one has {len(data)})", param="file"
            )
        now = utcnow()
        with self._sessions() as s, s.begin():
            row = s.get(UserFileRow, (tenant_id, path))
            if row is not None and not overwrite:
                raise UserFileExists(f"{path} already exists", param="file")
            self._check_room(s, tenant_id, path, len(data), replacing=row)
            if row is None:
                self._check_shape(s, tenant_id, path)
                row = UserFileRow(tenant_id=tenant_id, path=path, data=data, size=len(data), created_at=now)
                s.add(row)
            row.data, row.size, row.modified_at = data, len(data), now
            s.flush()
            return row

    def delete(self, tenant_id: str, path: str) -> bool:
        with self._sessions() as s, s.begin():
            gone = s.execute(
                delete(UserFileRow).where(UserFileRow.tenant_id == tenant_id, UserFileRow.path == clean_path(path))
            )
        return bool(gone.rowcount)

    def move(self, tenant_id: str, source: str, dest: str, *, overwrite: bool = True) -> UserFileRow | None:
        """Rename ``source`` to ``dest`` (replacing it unless ``overwrite`` is off); None when
        there is no ``source``."""
        source, dest = clean_path(source), clean_path(dest, "dest")
        with self._sessions() as s, s.begin():
            row = s.get(UserFileRow, (tenant_id, source))
            if row is None:
                return None
            if source == dest:
                return row
            target = s.get(UserFileRow, (tenant_id, dest))
            if target is not None:
                if not overwrite:
                    raise UserFileExists(f"{dest} already exists", param="dest")
                s.delete(target)
                s.flush()
            else:
                self._check_shape(s, tenant_id, dest)
            moved = UserFileRow(
                tenant_id=tenant_id,
                path=dest,
                data=row.data,
                size=row.size,
                created_at=row.created_at,
                modified_at=utcnow(),
            )
            s.delete(row)
            s.flush()
            s.add(moved)
            s.flush()
            return moved

    def _check_room(self, s: Session, tenant_id: str, path: str, size: int, replacing: UserFileRow | None) -> None:
        count, total = s.execute(
            select(func.count(), func.coalesce(func.sum(UserFileRow.size), 0)).where(
                UserFileRow.tenant_id == tenant_id, UserFileRow.path != path
            )
        ).one()
        if replacing is None and count + 1 > self.max_files:
            raise UserQuotaExceeded(f"a tenant keeps at most {self.max_files} user files", param="file")
        if total + size > self.max_total_bytes:
            raise UserQuotaExceeded(
                f"a tenant's user files are limited to {self.max_total_bytes} bytes together "
                f"({total} used by the others)",
                param="file",
            )

    @staticmethod
    def _check_shape(s: Session, tenant_id: str, path: str) -> None:
        """A path is a file or a folder, never both (as on a file system)."""
        parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
        clash = s.scalar(
            select(UserFileRow.path)
            .where(
                UserFileRow.tenant_id == tenant_id,
                or_(UserFileRow.path.startswith(path + "/", autoescape=True), UserFileRow.path.in_(parents)),
            )
            .limit(1)
        )
        if clash is not None:
            raise UserPathRefused(f"{path} clashes with {clash} (a path is either a file or a folder)", param="file")
