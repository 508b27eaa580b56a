"""Operations: health and Prometheus metrics (no key needed)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from deltaserve.server.metrics import CONTENT_TYPE
from deltaserve.server.routes import SERVICE
from deltaserve.server.service import Service

router = APIRouter()


@router.get("/health")
async def health(service: Service = SERVICE) -> Response:
    try:
        await service.engine.check_health()
    except Exception:  # noqa: BLE001 - any engine failure is "unhealthy"; details stay in the logs
        return JSONResponse({"status": "unhealthy"}, status_code=503)
    ranks = getattr(service.engine, "ranks", [])
    support = getattr(service.engine, "lora_support", None)
    off = "--lora off" if not service.settings.engine.enable_lora else getattr(support, "off", "")
    lora = f"off: {off}" if off else "on"
    return JSONResponse({"status": "ok", "experts": len(service.engine.experts),
                         "store_generation": service.engine.generation, "ranks": len(ranks),
                         "model": ranks[0].get("model") if ranks else None, "lora": lora,
                         "dense_swaps": ranks[0]["swap"] if ranks else None})


@router.get("/metrics")
async def metrics(service: Service = SERVICE) -> Response:
    service.metrics.engine_up.set(1 if service.engine.alive else 0)
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
