"""The LoRA store over HTTP: list, upload (streamed to disk, checked, then renamed into
place), delete."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ryla.api.errors import ApiError
from ryla.api.schemas import ErrorResponse, LoraInfo, LoraList
from ryla.api.service import Service, get_service
from ryla.models.lora_format import LoraFormatError
from ryla.models.loras import (
    InvalidLora,
    InvalidLoraId,
    LoraExists,
    LoraNotFound,
    StoreUnavailable,
    check_id,
    check_trigger_word,
    id_from_filename,
)
from ryla.runtime import Runtime

router = APIRouter(tags=["loras"])


@contextmanager
def lora_errors(lora_id: str):
    """The store's errors about one id, as API errors."""
    try:
        yield
    except InvalidLoraId as exc:
        raise ApiError(422, "invalid_lora_id", str(exc))
    except LoraNotFound as exc:
        raise ApiError(404, "lora_not_found", str(exc), {"lora_id": lora_id})
    except InvalidLora as exc:
        raise ApiError(422, "invalid_lora", f"LoRA {lora_id!r} cannot be used: {exc}", {"lora_id": lora_id})
    except StoreUnavailable as exc:
        raise store_unavailable(exc)


def store_unavailable(exc: StoreUnavailable) -> ApiError:
    return ApiError(503, "store_unavailable", str(exc), headers={"Retry-After": str(exc.retry_after)})


async def lora_entry(runtime: Runtime, lora_id: str) -> dict:
    """The store's entry for an id, looked up off the event loop (a shared store may reload)."""
    with lora_errors(lora_id):
        return await asyncio.to_thread(runtime.loras.get, lora_id)


@router.get("/loras", response_model=LoraList, summary="LoRAs in the store")
async def list_loras(service: Service = Depends(get_service)) -> dict:
    try:
        return {"loras": await asyncio.to_thread(service.runtime.loras.list)}
    except StoreUnavailable as exc:
        raise store_unavailable(exc)


@router.post("/loras", status_code=201, response_model=LoraInfo,
             summary="Upload a LoRA (.safetensors, multipart field 'file'; optional 'id', 'trigger_word')",
             responses={413: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                        422: {"model": ErrorResponse, "description": "not a FLUX LoRA, or a bad id"}})
async def upload_lora(request: Request, service: Service = Depends(get_service)) -> dict:
    from starlette.requests import ClientDisconnect

    from ryla.api.middleware import BodyTooLarge

    try:
        form = await request.form(max_files=1, max_fields=4)
    except BodyTooLarge:
        raise ApiError(413, "payload_too_large",
                       f"LoRA upload over the limit of {service.settings.max_lora_bytes} bytes")
    except ClientDisconnect:
        raise ApiError(400, "upload_incomplete", "the upload was cut off; nothing was stored")
    except Exception as exc:  # malformed multipart bodies
        raise ApiError(422, "invalid_request", f"expected a multipart/form-data upload: {exc}")
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "invalid_request", "file: a .safetensors file is required (multipart field 'file')",
                       {"errors": [{"field": "file", "message": "required"}]})
    raw_id = form.get("id")
    trigger = form.get("trigger_word")
    try:
        lora_id = check_id(raw_id) if isinstance(raw_id, str) and raw_id else id_from_filename(upload.filename or "")
    except InvalidLoraId as exc:
        raise ApiError(422, "invalid_lora_id", str(exc), {"errors": [{"field": "id", "message": str(exc)}]})
    try:
        trigger = check_trigger_word(trigger if isinstance(trigger, str) else None)
    except InvalidLoraId as exc:
        raise ApiError(422, "invalid_request", str(exc), {"errors": [{"field": "trigger_word", "message": str(exc)}]})

    def chunks():
        upload.file.seek(0)
        while chunk := upload.file.read(1 << 20):
            yield chunk

    try:
        return await asyncio.to_thread(service.runtime.loras.add_chunks, chunks(), lora_id, trigger)
    except LoraExists as exc:
        raise ApiError(409, "lora_exists", str(exc))
    except LoraFormatError as exc:
        raise ApiError(422, "invalid_lora", f"not a FLUX LoRA for this model: {exc}")
    except StoreUnavailable as exc:
        raise store_unavailable(exc)
    finally:
        await upload.close()


@router.delete("/loras/{lora_id}", status_code=204, response_class=Response)
async def delete_lora(lora_id: str, service: Service = Depends(get_service)) -> Response:
    with lora_errors(lora_id):
        await asyncio.to_thread(service.runtime.loras.remove, lora_id)
    return Response(status_code=204)
