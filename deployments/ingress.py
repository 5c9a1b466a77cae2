"""Ingress deployment (CPU, FastAPI): the OpenAI-compatible HTTP API and the Python handle.

It validates every request (limits from config), decides the mix (explicit ``adapters``,
``model: <adapter>``, or the router for ``model: dlp``), sends the request to a LoRA worker
and reports the mix it used. Bad input is a 4xx naming the field; a busy or restarting
backend is a 503 with Retry-After; nothing the client sent can make it answer 500.
"""

# No `from __future__ import annotations`: Serve rebuilds the FastAPI endpoints of the class
# in its own module, where string annotations (Request) would not resolve.
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.api_models import (
    ROUTED_MODEL,
    AdapterInfo,
    AdapterList,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DlpInfo,
    GenerateRequest,
    GenerateResponse,
    MixSwitchInfo,
    ModelCard,
    ModelList,
    RegisterAdapterRequest,
    RequestError,
    RouteDecisionModel,
    RouteRequest,
    RouteResponse,
    SamplingFields,
    Usage,
    WorkerChunk,
    WorkerRequest,
    routing_view,
)
from deployments.metrics import IngressMetrics
from deployments.validation import (
    check_admin,
    enforce_limits,
    explicit_mix,
    from_validation_error,
    resolve_under_root,
)
from dlp.config import AppConfig
from dlp.routing.mix import AdapterMix

log = logging.getLogger("ray.serve")

app = FastAPI(title="dlp-serve", description="DLP-LoRA: routed multi-LoRA fusion")

M = TypeVar("M", bound=BaseModel)

CATALOGUE_TTL_S = 1.0
RETRY_AFTER_S = "1"


def _cause(exc: BaseException) -> BaseException:
    """The user exception inside Ray's wrappers (RayTaskError keeps it as ``cause``)."""
    seen = 0
    while seen < 5 and getattr(exc, "cause", None) is not None:
        exc = exc.cause  # type: ignore[assignment]
        seen += 1
    return exc


def _as_request_error(exc: BaseException) -> RequestError:
    """Map anything raised below the ingress to the status the client should see."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
        RequestCancelledError,
    )

    cause = _cause(exc)
    if isinstance(cause, RequestError):
        return RequestError(cause.status, cause.field, cause.message)
    if isinstance(exc, RequestError):
        return exc
    overloaded = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
    if isinstance(exc, overloaded) or isinstance(cause, overloaded):
        return RequestError(503, None, "server busy, retry shortly")
    if isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError):
        return RequestError(503, None, "a replica restarted while serving this request, retry")
    if isinstance(exc, RequestCancelledError):
        return RequestError(503, None, "request cancelled")
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return RequestError(504, None, "request timed out")
    log.exception("internal error", exc_info=exc)
    return RequestError(500, None, f"internal error: {type(cause).__name__}")


def _error_response(err: RequestError) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if err.status == 503 else None
    return JSONResponse(err.to_openai(), status_code=err.status, headers=headers)


def _parse(model: type[M], payload: Any) -> M:
    if isinstance(payload, model):
        return payload
    if isinstance(payload, BaseModel):
        payload = payload.model_dump()
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _dlp_info(chunk: WorkerChunk, source: str, top1: str | None, replica: str | None) -> DlpInfo:
    return DlpInfo(
        mix=chunk.mix,
        mix_key=chunk.mix_key,
        source=source,  # type: ignore[arg-type]
        switches=[MixSwitchInfo(at_token=t, mix=m, mix_key=k) for t, m, k in chunk.switches],
        top1=top1,
        replica=replica,
    )


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class _Plan:
    """A validated request with its mix decided."""

    worker: WorkerRequest
    source: str
    top1: str | None
    model: str


# Helpers sit above the class: @serve.ingress serialises the class when it is decorated.
def _usage(chunk: WorkerChunk) -> Usage:
    return Usage(
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
    )


def _include_usage(req: Any) -> bool:
    opts = getattr(req, "stream_options", None)
    return bool(opts and opts.get("include_usage"))


def _check_rank(path: Any, cap: int) -> None:
    """Refuse a rank above the cap before any weights are read (cheap, from the config)."""
    from dlp.lora.adapter import CONFIG_FILE

    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise RequestError(400, "path", f"{CONFIG_FILE} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise RequestError(400, "path", f"{CONFIG_FILE} must hold a JSON object")
    ranks = [config.get("r")]
    pattern = config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks += list(pattern.values())
    for r in ranks:
        if isinstance(r, int) and not isinstance(r, bool) and r > cap:
            raise RequestError(
                400, "path", f"adapter rank {r} is above this server's cap {cap} (max_adapter_rank)"
            )


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        router: DeploymentHandle,
        worker: DeploymentHandle,
        registry: DeploymentHandle,
        config: dict[str, Any],
    ) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.limits = self.cfg.limits
        self.adapter_root = self.cfg.resolved_adapter_root()
        self.router = router
        self.worker = worker
        self.registry = registry
        self.metrics = IngressMetrics()
        self._catalogue: dict[str, str] = {}
        self._catalogue_version = 0
        self._catalogue_at = 0.0
        self._labels: list[str] | None = None

    # --- catalogue ---------------------------------------------------------------------------

    async def _catalogue_now(self, force: bool = False) -> dict[str, str]:
        if force or time.monotonic() - self._catalogue_at > CATALOGUE_TTL_S:
            version, catalogue = await self.registry.snapshot.remote()
            self._catalogue_version, self._catalogue = version, catalogue
            self._catalogue_at = time.monotonic()
        return self._catalogue

    async def _known(self, names: list[str]) -> dict[str, str]:
        """Paths of ``names``; refreshes once before calling a name unknown."""
        catalogue = await self._catalogue_now()
        if any(n not in catalogue for n in names):
            catalogue = await self._catalogue_now(force=True)
        return {n: catalogue[n] for n in names if n in catalogue}

    async def _router_labels(self) -> list[str]:
        if self._labels is None:
            self._labels = await self.router.labels.remote()
        return self._labels

    # --- the common path ---------------------------------------------------------------------

    async def _plan(
        self,
        req: SamplingFields,
        *,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
        routing_text: str,
    ) -> _Plan:
        max_tokens = enforce_limits(req, self.limits)
        top1: str | None = None
        if req.model != ROUTED_MODEL:
            paths = await self._known([req.model])
            if req.model not in paths:
                raise RequestError(
                    404, "model", f"unknown model {req.model!r} (use 'dlp' or an adapter name)"
                )
        if req.adapters is not None:
            mix = explicit_mix(req.adapters, self.limits)
            source = "explicit"
        elif req.model != ROUTED_MODEL:
            mix = AdapterMix.single(req.model)
            source = "model"
        else:
            decision = await self.router.route.remote(routing_text)
            mix = AdapterMix.from_weights(decision["mix"])
            top1 = decision["top1"]
            source = "routed"
        paths = await self._known(list(mix.names))
        missing = [n for n in mix.names if n not in paths]
        if missing and source == "routed":
            # A routed label whose adapter was deleted: keep the rest of the mix.
            kept = {n: w for n, w in mix.entries if n in paths}
            mix = AdapterMix.from_weights(kept) if kept else AdapterMix.base()
        elif missing:
            raise RequestError(404, "adapters", f"unknown adapter(s): {', '.join(missing)}")
        worker_req = WorkerRequest(
            request_id=f"dlp-{uuid.uuid4().hex[:24]}",
            mix=mix.as_dict(),
            mix_key=mix.key,
            adapter_paths={n: paths[n] for n in mix.names},
            prompt=prompt,
            messages=tuple(messages) if messages is not None else None,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=tuple(req.stop_list()),
            ignore_eos=req.ignore_eos,
            routing=req.routing,
        )
        return _Plan(worker=worker_req, source=source, top1=top1, model=req.model)

    async def _run(self, plan: _Plan) -> WorkerChunk:
        response = self.worker.generate.remote(plan.worker)
        try:
            result: WorkerChunk = await asyncio.wait_for(
                response, timeout=self.cfg.ingress.request_timeout_s
            )
        except TimeoutError:
            response.cancel()
            raise
        n = len(result.mix)
        self.metrics.generated(result.prompt_tokens, result.completion_tokens, n)
        self.metrics.mix_source.inc(tags={"source": plan.source})
        return result

    async def _stream(self, plan: _Plan) -> tuple[WorkerChunk, AsyncIterator[WorkerChunk]]:
        """Start a streamed generation; the first chunk is awaited here so that bad input
        found by the worker (prompt too long, unloadable adapter) is still a plain 4xx."""
        gen = self.worker.options(stream=True).generate_stream.remote(plan.worker)
        deadline = time.monotonic() + self.cfg.ingress.request_timeout_s
        try:
            first = await asyncio.wait_for(gen.__anext__(), timeout=deadline - time.monotonic())
        except BaseException:
            gen.cancel()
            raise

        async def rest() -> AsyncIterator[WorkerChunk]:
            try:
                while True:
                    remaining = deadline - time.monotonic()
                    try:
                        chunk = await asyncio.wait_for(gen.__anext__(), timeout=remaining)
                    except StopAsyncIteration:
                        return
                    yield chunk
            finally:
                # Client gone or done: tell the worker so the slot is freed.
                gen.cancel()

        return first, rest()

    # --- HTTP plumbing -----------------------------------------------------------------------

    async def _body(self, request: Request) -> Any:
        cap = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > cap
            except ValueError:
                raise RequestError(400, "content-length", "invalid Content-Length") from None
            if too_big:
                raise RequestError(413, "body", f"request body is larger than {cap} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise RequestError(413, "body", f"request body is larger than {cap} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(400, "body", f"body is not valid UTF-8 ({exc.reason})") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(400, "body", f"malformed JSON: {exc.msg} at {exc.pos}") from None
        except RecursionError:
            raise RequestError(400, "body", "JSON nested too deeply") from None

    async def _answer(self, endpoint: str, work: Any) -> Response:
        try:
            response = await work
        except Exception as exc:
            err = _as_request_error(exc)
            self.metrics.finished(endpoint, err.status)
            return _error_response(err)
        self.metrics.finished(endpoint, response.status_code)
        return response

    # --- OpenAI endpoints --------------------------------------------------------------------

    @app.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        return await self._answer("completions", self._completions(request))

    async def _completions(self, request: Request) -> Response:
        req = _parse(CompletionRequest, await self._body(request))
        prompt = req.prompt_text()
        plan = await self._plan(
            req, prompt=prompt, messages=None, routing_text=routing_view(prompt)
        )
        created = int(time.time())
        rid = plan.worker.request_id
        if not req.stream:
            res = await self._run(plan)
            body = CompletionResponse(
                id=rid,
                created=created,
                model=req.model,
                choices=[CompletionChoice(text=res.text, finish_reason=res.finish_reason)],
                usage=_usage(res),
                dlp=_dlp_info(res, plan.source, plan.top1, res.replica),
            )
            return JSONResponse(body.model_dump())
        first, rest = await self._stream(plan)
        include_usage = _include_usage(req)

        def frame(chunk: WorkerChunk) -> bytes:
            return _sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": req.model,
                    "choices": [
                        {
                            "index": 0,
                            "text": chunk.text,
                            "finish_reason": chunk.finish_reason,
                            "logprobs": None,
                        }
                    ],
                    "dlp": _dlp_info(chunk, plan.source, plan.top1, chunk.replica).model_dump(),
                }
            )

        return self._sse_response(
            first, rest, frame, rid, created, req.model, include_usage, "text_completion", plan
        )

    @app.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        return await self._answer("chat", self._chat(request))

    async def _chat(self, request: Request) -> Response:
        req = _parse(ChatCompletionRequest, await self._body(request))
        plan = await self._plan(
            req, prompt=None, messages=req.message_dicts(), routing_text=req.routing_text()
        )
        created = int(time.time())
        rid = plan.worker.request_id
        if not req.stream:
            res = await self._run(plan)
            body = ChatCompletionResponse(
                id=rid,
                created=created,
                model=req.model,
                choices=[
                    ChatChoice(
                        message=AssistantMessage(content=res.text), finish_reason=res.finish_reason
                    )
                ],
                usage=_usage(res),
                dlp=_dlp_info(res, plan.source, plan.top1, res.replica),
            )
            return JSONResponse(body.model_dump())
        first, rest = await self._stream(plan)
        include_usage = _include_usage(req)
        sent_role = False

        def frame(chunk: WorkerChunk) -> bytes:
            nonlocal sent_role
            delta: dict[str, str] = {}
            if not sent_role:
                delta["role"] = "assistant"
                sent_role = True
            if chunk.text:
                delta["content"] = chunk.text
            return _sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": chunk.finish_reason}],
                    "dlp": _dlp_info(chunk, plan.source, plan.top1, chunk.replica).model_dump(),
                }
            )

        return self._sse_response(
            first,
            rest,
            frame,
            rid,
            created,
            req.model,
            include_usage,
            "chat.completion.chunk",
            plan,
        )

    def _sse_response(
        self,
        first: WorkerChunk,
        rest: AsyncIterator[WorkerChunk],
        frame: Any,
        rid: str,
        created: int,
        model: str,
        include_usage: bool,
        object_name: str,
        plan: _Plan,
    ) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            last = first
            yield frame(first)
            try:
                async for chunk in rest:
                    last = chunk
                    yield frame(chunk)
            except Exception as exc:  # after the headers: report in-band, then end
                err = _as_request_error(exc)
                yield _sse(err.to_openai())
                return
            self.metrics.generated(last.prompt_tokens, last.completion_tokens, len(last.mix))
            self.metrics.mix_source.inc(tags={"source": plan.source})
            if include_usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": object_name,
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(last).model_dump(),
                    }
                )
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/route")
    async def http_route(self, request: Request) -> Response:
        async def work() -> Response:
            out = await self.route(await self._body(request))
            return JSONResponse(out.model_dump())

        return await self._answer("route", work())

    @app.get("/v1/models")
    async def http_models(self) -> Response:
        async def work() -> Response:
            catalogue = await self._catalogue_now()
            cards = [ModelCard(id=ROUTED_MODEL)] + [ModelCard(id=n) for n in sorted(catalogue)]
            return JSONResponse(ModelList(data=cards).model_dump())

        return await self._answer("models", work())

    @app.get("/v1/adapters")
    async def http_list_adapters(self) -> Response:
        async def work() -> Response:
            catalogue = await self._catalogue_now(force=True)
            labels = set(await self._router_labels())
            data = [
                AdapterInfo(name=n, path=p, routable=n in labels)
                for n, p in sorted(catalogue.items())
            ]
            return JSONResponse(AdapterList(data=data).model_dump())

        return await self._answer("adapters", work())

    @app.post("/v1/adapters")
    async def http_register_adapter(self, request: Request) -> Response:
        return await self._answer("adapters_register", self._register(request))

    async def _register(self, request: Request) -> Response:
        check_admin(request.headers.get("authorization"))
        req = _parse(RegisterAdapterRequest, await self._body(request))
        path = resolve_under_root(req.path, self.adapter_root)
        _check_rank(path, self.limits.max_adapter_rank)
        if not req.replace and await self.registry.exists.remote(req.name):
            raise RequestError(409, "name", f"adapter {req.name!r} already exists (replace: true)")
        # A worker loads it against the base model (shapes, NaN, base model, rank) before
        # anything is recorded; a refused adapter leaves no trace.
        await self.worker.register_adapter.remote(req.name, str(path))
        await self.registry.add.remote(req.name, str(path), req.replace)
        await self._catalogue_now(force=True)
        labels = set(await self._router_labels())
        info = AdapterInfo(name=req.name, path=str(path), routable=req.name in labels)
        return JSONResponse(info.model_dump(), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def http_delete_adapter(self, name: str, request: Request) -> Response:
        async def work() -> Response:
            check_admin(request.headers.get("authorization"))
            await self.registry.remove.remote(name)
            await self._catalogue_now(force=True)
            return JSONResponse({"deleted": name})

        return await self._answer("adapters_delete", work())

    @app.get("/healthz")
    async def http_healthz(self) -> Response:
        async def work() -> Response:
            catalogue = await self._catalogue_now()
            return JSONResponse({"status": "ok", "adapters": len(catalogue)})

        return await self._answer("healthz", work())

    # --- Python handle API -------------------------------------------------------------------

    async def generate(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """``serve.get_app_handle("dlp").generate.remote(GenerateRequest(prompt=...))``.

        Bad input raises RequestError (status + field), as the HTTP API answers 4xx.
        """
        try:
            req = _parse(GenerateRequest, request)
            if (req.prompt is None) == (req.messages is None):
                raise RequestError(400, "prompt", "give exactly one of prompt / messages")
            if req.messages is not None:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                text = next(m["content"] for m in reversed(messages) if m["role"] == "user")
                plan = await self._plan(
                    req, prompt=None, messages=messages, routing_text=routing_view(text)
                )
            else:
                prompt = req.prompt or ""
                plan = await self._plan(
                    req, prompt=prompt, messages=None, routing_text=routing_view(prompt)
                )
            res = await self._run(plan)
        except Exception as exc:
            err = _as_request_error(exc)
            self.metrics.finished("handle_generate", err.status)
            raise err from None
        self.metrics.finished("handle_generate", 200)
        return GenerateResponse(
            request_id=plan.worker.request_id,
            text=res.text,
            finish_reason=res.finish_reason or "stop",
            prompt_tokens=res.prompt_tokens,
            completion_tokens=res.completion_tokens,
            dlp=_dlp_info(res, plan.source, plan.top1, res.replica),
        )

    async def route(self, request: RouteRequest | dict[str, Any]) -> RouteResponse:
        """Mixes for texts without generating (what ``model: dlp`` would use)."""
        try:
            req = _parse(RouteRequest, request)
            if len(req.texts) > self.limits.max_route_texts:
                raise RequestError(
                    400, "texts", f"at most {self.limits.max_route_texts} texts per call"
                )
            if req.max_adapters is not None and req.max_adapters > self.limits.max_adapters_per_mix:
                raise RequestError(
                    400,
                    "max_adapters",
                    f"max_adapters must be <= {self.limits.max_adapters_per_mix}",
                )
            max_adapters = req.max_adapters or self.limits.max_adapters_per_mix
            decisions = await asyncio.gather(
                *(
                    self.router.route.remote(routing_view(t), req.p, max_adapters, req.weighting)
                    for t in req.texts
                )
            )
        except Exception as exc:
            err = _as_request_error(exc)
            raise err from None
        return RouteResponse(
            decisions=[
                RouteDecisionModel(mix=d["mix"], mix_key=d["key"], top1=d["top1"], probs=d["probs"])
                for d in decisions
            ]
        )
