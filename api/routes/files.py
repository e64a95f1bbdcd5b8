from __future__ import annotations

from fastapi import APIRouter, UploadFile

from api.deps import SettingsDep, StorageDep, TenantDep
from api.schemas import FileOut
from core.db import session_scope
from core.files import get_file, store_file

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=201, response_model=FileOut)
def upload(file: UploadFile, tenant: TenantDep, settings: SettingsDep, storage: StorageDep) -> FileOut:
    """Upload an input image or mask (PNG, JPEG or WebP, 8 bits per channel). The same bytes always get
    the same id. A mask is read as its grey level over black: non-zero pixels are redrawn, transparent
    ones count as black; `mask_coverage` says what share of the pixels a mask made of it redraws."""
    data = file.file.read(settings.max_upload_bytes + 1)
    with session_scope(settings.database_url) as session:
        return FileOut.of(store_file(session, storage, tenant, data, settings))


@router.get("/{file_id}", response_model=FileOut)
def describe(file_id: str, tenant: TenantDep, settings: SettingsDep) -> FileOut:
    with session_scope(settings.database_url) as session:
        return FileOut.of(get_file(session, tenant, file_id))
