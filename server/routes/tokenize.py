"""vLLM's tokenizer endpoints: ``/tokenize``, ``/detokenize``, ``/tokenizer_info`` (same paths and shapes).

What ``vllm bench serve`` uses to align its prompts, and what lm-eval's
``local-completions`` uses as its tokenizer (``tokenizer_backend=auto``), so
neither needs the model's tokenizer on the client. Every recipe shares the
base's tokenizer; ``model``, when given, must be servable.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from deltaserve.server.prompts import check_vocab, tokenize_chat, tokenize_text, tokenizer_info
from deltaserve.server.vllm_compat import DetokenizeResponse, TokenizeResponse
from deltaserve.server.protocol.common import ErrorResponse
from deltaserve.server.protocol.tokenize import Detokenize, TokenizeChat, TokenizeCompletion
from deltaserve.server.routes import INFERENCE, SERVICE
from deltaserve.server.service import Service

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404)}
router = APIRouter(dependencies=[INFERENCE], responses=ERRORS)


async def _check_model(service: Service, model: str | None) -> None:
    if model is not None:
        await service.resolve(model, None, record=False)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(req: TokenizeCompletion | TokenizeChat, service: Service = SERVICE) -> TokenizeResponse:
    await _check_model(service, req.model)
    tok = service.engine.tokenizer
    if isinstance(req, TokenizeChat):
        ids = await asyncio.to_thread(tokenize_chat, tok, req)
    else:
        ids = await asyncio.to_thread(tokenize_text, tok, req)
    strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=service.settings.engine.max_model_len, tokens=ids,
                            token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(req: Detokenize, service: Service = SERVICE) -> DetokenizeResponse:
    await _check_model(service, req.model)
    tok = service.engine.tokenizer
    check_vocab(tok, req.tokens, "tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(tok.decode, req.tokens))


@router.get("/tokenizer_info")
async def get_tokenizer_info(service: Service = SERVICE) -> dict:
    """The tokenizer's configuration (vLLM's ``TokenizerInfoResponse``: init kwargs, class, chat template)."""
    return tokenizer_info(service.engine.tokenizer)
