"""vLLM's runtime LoRA endpoints, mapped onto expert registration: tools written for vLLM's dynamic LoRA
loading work unchanged.

``POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"?}`` registers ``lora_path`` (under a
``--register-root``) as the expert ``lora_name`` (``load_inplace`` replaces it); ``POST
/v1/unload_lora_adapter {"lora_name"}`` deletes it. Both answer vLLM's plain-text success line; errors
keep this server's table (403 outside the roots, 409 a name that exists, 404 an unknown one).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from deltaserve.server.exceptions import InvalidRequest
from deltaserve.server.protocol.admin import ExpertRegistration
from deltaserve.server.protocol.common import ErrorResponse
from deltaserve.server.protocol.tokenize import LoadLoRAAdapter, UnloadLoRAAdapter
from deltaserve.server.routes import ADMIN, SERVICE
from deltaserve.server.service import Service

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409)}
router = APIRouter(dependencies=[ADMIN], responses=ERRORS)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(req: LoadLoRAAdapter, service: Service = SERVICE) -> PlainTextResponse:
    if req.is_3d_lora_weight:
        raise InvalidRequest("3D (mixture-of-experts) LoRA weights are not served", "is_3d_lora_weight")
    await service.register(ExpertRegistration(name=req.lora_name, path=req.lora_path, replace=req.load_inplace))
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(req: UnloadLoRAAdapter, service: Service = SERVICE) -> PlainTextResponse:
    await service.delete(req.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
