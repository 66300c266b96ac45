"""The coordinator's HTTP API: the narrow door of the federated deployment (DESIGN §6).

A Ray Serve application (FastAPI ingress) in the operator's cluster, in front of the coordinator
actor. Contributors on their own Ray clusters talk to it with `client.HttpTransport`; they hold
no cluster token and no store credential. It offers exactly a node agent's calls:

    GET  /v1/health                       no authentication (probes)
    GET  /v1/node/info                    backbone record (no store keys or paths), settings,
                                          own expert and counted submission ids
    GET  /v1/node/status                  own record and the versions (ids, sizes, whether
                                          the node is in each); nothing of other nodes
    GET  /v1/node/backbone/{file}         one backbone file, streamed; sha256 in the record
    POST /v1/node/uploads                 {kind, size, sha256} -> {upload, received}
    GET  /v1/node/uploads/{id}            how much of an upload the server has
    PUT  /v1/node/uploads/{id}?offset=N   one chunk (<= chunk_bytes), appended at N
    POST /v1/node/expert                  {upload, fingerprint}: register the MLP weights
    POST /v1/node/stats                   {upload, submission_id, num_tokens, holdout}
    POST /v1/node/settle                  publish what is pending (a rerun of a counted join)
    POST /v1/node/leave                   withdraw
    POST /v1/node/credential              {credential_hash, public_key}: rotate own credential

Operator operations (add-node, unlearn, rebase, publish, hold, rotation of another node's
credential) are not here: they stay on the operator's cluster, as actor calls.

Every `/v1/node/*` request is signed (`signing`); the coordinator checks the signature against
the node's public key, the timestamp and the nonce. Here, before anything reaches it: names are
checked (no separators, no ``..``); failed authentications are throttled per node and per client
address; a body larger than the endpoint's limit is refused from its ``Content-Length`` before
it is read; JSON bodies are JSON objects (nothing is unpickled or executed); uploaded payloads
stay bytes until the coordinator parses them as safetensors. Errors are one line, with paths and
URLs redacted; an authentication failure says only that it failed (or that the request expired).
"""

# (no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime)

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from dume_dist.distributed import signing
from dume_dist.distributed import state as st
from dume_dist.store import StoreError

log = logging.getLogger("dume.api")

APP_NAME = "dume-api"
UPLOAD_KINDS = ("expert", "stats", "holdout")
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+")
_PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*")


@dataclass(frozen=True)
class ApiLimits:
    json_bytes: int = 64 << 10
    chunk_bytes: int = 8 << 20
    upload_bytes: int = 64 << 30
    uploads_per_node: int = 8
    holdout_parts: int = 16
    failures_per_node: int = 20
    failures_per_address: int = 10
    failure_window_s: float = 60.0
    upload_ttl_s: float = 24 * 3600.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.extra = status, extra

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": str(self), **self.extra}, self.status, headers=headers)


def redact(message: str) -> str:
    """One line, no URLs or absolute paths (store locations, the operator's directories)."""
    line = (message.strip().splitlines() or ["error"])[0]
    return _PATH.sub("<path>", _URL.sub("<url>", line))[:300]


def public_info(info: dict) -> dict:
    """`Coordinator.node_info` without the backbone's store prefix and source paths."""
    backbone = {k: v for k, v in info["backbone"].items() if k not in ("prefix", "sources")}
    keep = ("settings", "expert", "submissions", "state", "latest")
    return {"backbone": backbone, **{k: info[k] for k in keep}}


def versions_view(status: dict, name: str) -> list[dict]:
    versions = (status.get("registry") or {}).get("versions", [])
    return [{"version": v["version"], "created_at": v["created_at"],
             "num_experts": len(v["contributors"]), "includes_you": name in v["contributors"]}
            for v in versions if not v.get("purged")]  # fmt: skip


def _json_object(body: bytes) -> dict:
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        out = json.loads(body or b"{}", parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(out, dict):
        raise ApiError(400, "body must be a JSON object")
    return out


def _signed_path(request: Request) -> str:
    """The path and query exactly as the client sent them (before percent-decoding)."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else request.url.path
    query = request.scope.get("query_string", b"").decode("latin-1")
    return path + (f"?{query}" if query else "")


app = FastAPI(title="dume coordinator API", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(app)
class CoordinatorAPI:
    def __init__(self, coordinator_name: str, namespace: str, upload_dir: str | None = None,
                 limits: dict | None = None, trust_forwarded_for: bool = False):  # fmt: skip
        self.coordinator = ray.get_actor(coordinator_name, namespace=namespace)
        self.limits = ApiLimits(**(limits or {}))
        self.uploads = Path(upload_dir or os.path.join(tempfile.gettempdir(), "dume-api-uploads"))
        self.trust_forwarded_for = trust_forwarded_for
        lim = self.limits
        self.node_failures = signing.Throttle(lim.failures_per_node, lim.failure_window_s)
        self.addr_failures = signing.Throttle(lim.failures_per_address, lim.failure_window_s)

    # -- routes ------------------------------------------------------------------------------

    @app.get("/v1/health")
    async def health(self) -> dict:
        return {"ok": True}

    @app.get("/v1/node/info")
    async def info(self, request: Request):
        return await self._guard(request, self._info)

    @app.get("/v1/node/status")
    async def status(self, request: Request):
        return await self._guard(request, self._status)

    @app.get("/v1/node/backbone/{rel:path}")
    async def backbone(self, request: Request, rel: str):
        return await self._guard(request, self._backbone, rel)

    @app.post("/v1/node/uploads")
    async def create_upload(self, request: Request):
        return await self._guard(request, self._create_upload)

    @app.get("/v1/node/uploads/{upload}")
    async def upload_state(self, request: Request, upload: str):
        return await self._guard(request, self._upload_state, upload)

    @app.put("/v1/node/uploads/{upload}")
    async def upload_chunk(self, request: Request, upload: str):
        return await self._guard(request, self._upload_chunk, upload)

    @app.post("/v1/node/expert")
    async def expert(self, request: Request):
        return await self._guard(request, self._expert)

    @app.post("/v1/node/stats")
    async def stats(self, request: Request):
        return await self._guard(request, self._stats)

    @app.post("/v1/node/settle")
    async def settle(self, request: Request):
        return await self._guard(request, self._settle)

    @app.post("/v1/node/leave")
    async def leave(self, request: Request):
        return await self._guard(request, self._leave)

    @app.post("/v1/node/credential")
    async def credential(self, request: Request):
        return await self._guard(request, self._credential)

    # -- handlers: (request, (envelope, name, domain), body, node_info) -> JSON or a Response --

    async def _info(self, request, who, body, info):
        return public_info(info)

    async def _status(self, request, who, body, info):
        everything = await self._call("status")
        mine = {k: info[k] for k in ("state", "expert", "submissions", "latest")}
        return {**mine, "hold": everything["registry"].get("hold"),
                "versions": versions_view(everything, who[1])}  # fmt: skip

    async def _backbone(self, request, who, body, info, rel: str):
        files = info["backbone"]["files"]
        if rel not in files:
            raise ApiError(404, "no such backbone file")
        size, chunk = int(files[rel]["size"]), self.limits.chunk_bytes

        async def stream():
            for offset in range(0, size, chunk):
                yield await self._call("backbone_chunk", rel, offset, min(chunk, size - offset))

        headers = {"content-length": str(size), "x-dume-sha256": files[rel]["sha256"]}
        return StreamingResponse(stream(), media_type="application/octet-stream", headers=headers)

    async def _create_upload(self, request, who, body, info):
        meta = _json_object(body)
        kind, size, sha = meta.get("kind"), meta.get("size"), meta.get("sha256")
        if kind not in UPLOAD_KINDS:
            raise ApiError(400, f"upload kind must be one of {', '.join(UPLOAD_KINDS)}")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= self.limits.upload_bytes:  # fmt: skip
            raise ApiError(413 if isinstance(size, int) and size > 0 else 400,
                           f"upload size must be 1..{self.limits.upload_bytes} bytes")  # fmt: skip
        if not isinstance(sha, str) or not HEX64.match(sha):
            raise ApiError(400, "sha256 must be 64 lowercase hex digits")
        name = who[1]
        upload = hashlib.sha256(f"{name}\n{kind}\n{sha}\n{size}".encode()).hexdigest()[:32]
        folder = self._node_dir(name)
        meta_file = folder / f"{upload}.json"
        if not meta_file.exists():
            if len(list(folder.glob("*.json"))) >= self.limits.uploads_per_node:
                raise ApiError(409, "too many unfinished uploads for this node")
            (folder / f"{upload}.part").touch()
            meta_file.write_text(json.dumps({"kind": kind, "size": size, "sha256": sha}))
        received = (folder / f"{upload}.part").stat().st_size
        return {"upload": upload, "received": received, "chunk_bytes": self.limits.chunk_bytes}

    async def _upload_state(self, request, who, body, info, upload: str):
        meta, part = self._staged(who[1], upload)
        return {"upload": upload, "received": part.stat().st_size, "size": meta["size"]}

    async def _upload_chunk(self, request, who, body, info, upload: str):
        offset = request.query_params.get("offset", "")
        if not offset.isdigit():
            raise ApiError(400, "offset must be a non-negative integer")
        meta, part = self._staged(who[1], upload)
        have = part.stat().st_size
        if int(offset) != have:
            raise ApiError(409, f"upload is at byte {have}, not {offset}", received=have)
        if have + len(body) > meta["size"]:
            raise ApiError(400, f"chunk runs past the declared size {meta['size']}")
        with open(part, "ab") as f:
            f.write(body)
        return {"upload": upload, "received": have + len(body)}

    async def _expert(self, request, who, body, info):
        req = _json_object(body)
        fingerprint = req.get("fingerprint")
        if not isinstance(fingerprint, str) or not HEX64.match(fingerprint):
            raise ApiError(400, "fingerprint must be 64 lowercase hex digits")
        blob = self._finished(who[1], req.get("upload"), "expert")
        out = await self._call("register_expert", *who, ray.put(blob), fingerprint)
        self._discard(who[1], req["upload"])
        return out

    async def _stats(self, request, who, body, info):
        req = _json_object(body)
        sid, num_tokens, holdout = req.get("submission_id"), req.get("num_tokens"), req.get("holdout") or {}  # fmt: skip
        if not isinstance(sid, str) or not HEX64.match(sid):
            raise ApiError(400, "submission_id must be 64 lowercase hex digits")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ApiError(400, "num_tokens must be a positive integer")
        if not isinstance(holdout, dict) or len(holdout) > self.limits.holdout_parts:
            raise ApiError(400, f"holdout must map at most {self.limits.holdout_parts} decays to uploads")  # fmt: skip
        stats = self._finished(who[1], req.get("upload"), "stats")
        held = {str(k): self._finished(who[1], v, "holdout") for k, v in holdout.items()}
        args = [*who, ray.put(stats), sid, num_tokens] + ([ray.put(held)] if held else [])
        out = await self._call("submit_stats", *args)
        for upload in [req["upload"], *holdout.values()]:
            self._discard(who[1], upload)
        return out

    async def _settle(self, request, who, body, info):
        _json_object(body)
        return await self._call("settle", *who)

    async def _leave(self, request, who, body, info):
        _json_object(body)
        return await self._call("leave", *who)

    async def _credential(self, request, who, body, info):
        req = _json_object(body)
        return await self._call(
            "rotate_own_credential", *who, req.get("credential_hash"), req.get("public_key")
        )

    # -- plumbing ----------------------------------------------------------------------------

    async def _guard(self, request: Request, handler, *args) -> Response:
        """Name checks, throttling, size limits, the signed envelope; errors to JSON."""
        try:
            who, address = self._identity(request)
            wait = max(self.node_failures.retry_after(who[0]), self.addr_failures.retry_after(address))  # fmt: skip
            if wait > 0:
                raise ApiError(429, "too many failed authentications: retry later",
                               retry_after_s=round(wait, 1))  # fmt: skip
            body = await self._read_body(request)
            path = _signed_path(request)
            try:
                env = signing.envelope(request.headers, request.method, path,
                                       hashlib.sha256(body).hexdigest())  # fmt: skip
                info = await self._call("node_info", env, *who)  # authenticates, first
                out = await handler(request, (env, *who), body, info, *args)
            except PermissionError as exc:
                expired = getattr(exc, "expired", False)
                if not expired:  # (an expired signature is what a coordinator restart causes)
                    self.node_failures.fail(who[0])
                    self.addr_failures.fail(address)
                raise ApiError(401, signing.EXPIRED if expired else "authentication failed",
                               retry=expired) from None  # fmt: skip
            return out if isinstance(out, Response) else JSONResponse(out)
        except ApiError as exc:
            retry = exc.extra.get("retry_after_s")
            return exc.response({"retry-after": str(int(retry) + 1)} if retry else None)
        except ValueError as exc:
            return ApiError(400, redact(str(exc))).response()
        except StoreError:
            return ApiError(503, "the coordinator's store is unavailable: retry").response()
        except Exception:
            log.exception("internal error")
            return ApiError(500, "internal error").response()

    def _identity(self, request: Request) -> tuple[tuple[str, str], str]:
        name = request.headers.get(signing.HEADER_NODE, "")
        domain = request.headers.get(signing.HEADER_DOMAIN, "")
        if not name or not domain:
            raise ApiError(401, "unsigned request (no node or domain)")
        st.check_name("node name", name)
        st.check_name("domain", domain)
        address = request.client.host if request.client else "unknown"
        forwarded = request.headers.get("x-forwarded-for")
        if self.trust_forwarded_for and forwarded:
            address = forwarded.split(",")[-1].strip()[:64]
        return (name, domain), address

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused from its Content-Length before it is read when over the limit."""
        upload = request.method == "PUT"
        limit = self.limits.chunk_bytes if upload else self.limits.json_bytes
        length = request.headers.get("content-length")
        if length is None:
            if request.headers.get("transfer-encoding"):
                raise ApiError(411, "Content-Length is required")
            return b""
        if not length.isdigit():
            raise ApiError(400, "malformed Content-Length")
        if int(length) > limit:
            raise ApiError(413, f"body of {int(length)} bytes is over this endpoint's limit of {limit}")  # fmt: skip
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        want = "application/octet-stream" if upload else "application/json"
        if int(length) and kind != want:
            raise ApiError(415, f"content type must be {want}")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > int(length):
                raise ApiError(400, "body is longer than its Content-Length")
        if len(body) != int(length):
            raise ApiError(400, "body is shorter than its Content-Length")
        return bytes(body)

    async def _call(self, method: str, *args):
        """A coordinator call. A signed envelope is tagged with the call's name: one HTTP request
        may make several calls with its envelope (authenticate, then act), each once."""
        if args and signing.is_envelope(args[0]):
            args = ({**args[0], "call": method}, *args[1:])
        try:
            return await getattr(self.coordinator, method).remote(*args)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if cause is None:
                raise RuntimeError("coordinator call failed") from None
            raise cause from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            raise ApiError(503, "the coordinator is restarting: retry") from None

    def _node_dir(self, name: str) -> Path:
        folder = self.uploads / name
        folder.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - self.limits.upload_ttl_s
        for old in folder.glob("*.json"):  # abandoned uploads
            if old.stat().st_mtime < cutoff:
                self._discard(name, old.stem)
        return folder

    def _staged(self, name: str, upload) -> tuple[dict, Path]:
        if not isinstance(upload, str) or not UPLOAD_ID.match(upload):
            raise ApiError(400, "upload id must be 32 lowercase hex digits")
        folder = self._node_dir(name)
        meta_file, part = folder / f"{upload}.json", folder / f"{upload}.part"
        if not meta_file.is_file() or not part.is_file():
            raise ApiError(404, f"no upload {upload} for this node")
        return json.loads(meta_file.read_text()), part

    def _finished(self, name: str, upload, kind: str) -> bytes:
        meta, part = self._staged(name, upload)
        if meta["kind"] != kind:
            raise ApiError(400, f"upload {upload} holds {meta['kind']}, not {kind}")
        if part.stat().st_size != meta["size"]:
            raise ApiError(400, f"upload {upload} is incomplete ({part.stat().st_size} of {meta['size']} bytes)")  # fmt: skip
        data = part.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            self._discard(name, upload)
            raise ApiError(400, f"upload {upload} does not match its sha256: send it again")
        return data

    def _discard(self, name: str, upload: str) -> None:
        for suffix in (".json", ".part"):
            (self.uploads / name / f"{upload}{suffix}").unlink(missing_ok=True)


def serve_api(coordinator_name: str, namespace: str, *, host: str = "127.0.0.1", port: int = 8443,
              tls_cert: str | None = None, tls_key: str | None = None,
              upload_dir: str | None = None, limits: ApiLimits | None = None,
              trust_forwarded_for: bool = False) -> str:  # fmt: skip
    """Deploy the API (Serve's proxy on the head only) on the cluster this process is connected
    to; returns its URL. With ``tls_cert`` and ``tls_key`` (PEM files readable on the head) it
    speaks HTTPS; without, plain HTTP (behind a TLS-terminating ingress, or on 127.0.0.1)."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    for path in (tls_cert, tls_key):
        if path and not Path(path).is_file():
            raise ValueError(f"TLS file {path} does not exist")
    http = {"host": host, "port": int(port), "location": "HeadOnly"}
    if tls_cert:
        http.update(ssl_certfile=str(Path(tls_cert).resolve()), ssl_keyfile=str(Path(tls_key).resolve()))  # fmt: skip
    serve.start(http_options=http)
    bound = CoordinatorAPI.bind(coordinator_name, namespace, upload_dir,
                                asdict(limits or ApiLimits()), trust_forwarded_for)  # fmt: skip
    serve.run(bound, name=APP_NAME, route_prefix="/", blocking=False)
    # A Serve instance already running keeps its own HTTP options (port, TLS): never report an
    # HTTPS API that is in fact plain HTTP, or on another port.
    speaks = _speaks_tls("127.0.0.1" if host in ("0.0.0.0", "::") else host, int(port))
    if speaks is None or speaks != bool(tls_cert):
        serve.delete(APP_NAME)
        found = "nothing" if speaks is None else ("HTTPS" if speaks else "plain HTTP")
        raise ValueError(
            f"Ray Serve on this cluster was started with other HTTP options ({found} on port "
            f"{port}): run `serve shutdown` first or use its port and TLS settings"
        )
    return f"{'https' if tls_cert else 'http'}://{host}:{port}"


def _speaks_tls(host: str, port: int, timeout_s: float = 10.0) -> bool | None:
    """Whether ``host:port`` answers a TLS handshake (None: nothing listens there)."""
    import socket
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only asks: TLS or not
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            try:
                with ctx.wrap_socket(sock, server_hostname=host):
                    return True
            except (ssl.SSLError, ConnectionError, TimeoutError):
                return False
    except OSError:
        return None
