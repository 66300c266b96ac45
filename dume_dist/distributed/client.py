"""The contributor's client of the coordinator's HTTP API (`dume_dist.distributed.api`).

`HttpTransport` is the node agent's transport outside the operator's cluster: the same calls as
`agent.ActorTransport` (node info, backbone download, expert upload, statistics submit, settle, leave),
each request signed with the node's key (`signing`), over HTTPS (``ca_cert`` pins the
coordinator's certificate or its CA). No Ray here: it runs inside the contributor's own cluster
or in a plain process.

Uploads are **resumable**: a payload is sent in chunks to an upload named by (node, kind, sha256,
size), so a restarted client asks how much the server has and continues from there; the final
call (register the expert, submit the statistics) names the finished uploads. Transient failures
(connection refused or reset, 502/503/504, a coordinator restarting) are retried until
``retry_s`` has passed; a request refused as expired is signed again. ``sent`` counts the bytes
put on the wire by kind (retransmissions included).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

from dume_dist.distributed import signing

TRANSIENT_STATUS = (502, 503, 504)


class HttpTransport:
    kind = "http"

    def __init__(self, url: str, name: str, domain: str, secret: str, *,
                 ca_cert: str | None = None, timeout_s: float = 120.0, retry_s: float = 180.0,
                 chunk_bytes: int = 8 << 20):  # fmt: skip
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--coordinator-url must be http(s)://HOST:PORT, got {url!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"--coordinator-url takes no path or query, got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.name, self.domain, self._secret = name, domain, secret
        self.ca_cert, self.timeout_s, self.retry_s = ca_cert, timeout_s, retry_s
        self.chunk_bytes = chunk_bytes
        self.sent = {"requests": 0, "expert": 0, "stats": 0, "holdout": 0}
        self.received = 0
        self._session = None

    def __getstate__(self):  # travels to the agent actor without its connection pool
        return {**self.__dict__, "_session": None}

    # -- the transport -----------------------------------------------------------------------

    def node_info(self) -> dict:
        return self._json("GET", "/v1/node/info")

    def download_backbone(self, record: dict, dest: Path) -> None:
        """Every backbone file, streamed to ``dest``; size and sha256 checked against the record."""
        for rel, want in sorted(record["files"].items()):
            self._download(f"/v1/node/backbone/{rel}", Path(dest) / rel, want)

    def register_expert(self, blob: bytes, fingerprint: str) -> dict:
        upload = self.upload("expert", blob)
        return self._json("POST", "/v1/node/expert", {"upload": upload, "fingerprint": fingerprint})

    def submit_stats(self, stats: bytes, submission_id: str, num_tokens: int, holdout: dict):
        body = {"upload": self.upload("stats", stats), "submission_id": submission_id,
                "num_tokens": num_tokens,
                "holdout": {str(b): self.upload("holdout", d) for b, d in holdout.items()}}  # fmt: skip
        return self._json("POST", "/v1/node/stats", body)

    def leave(self) -> dict:
        return self._json("POST", "/v1/node/leave", {})

    def settle(self) -> dict:
        return self._json("POST", "/v1/node/settle", {})

    # -- more of the API ---------------------------------------------------------------------

    def status(self) -> dict:
        return self._json("GET", "/v1/node/status")

    def rotate(self, new_secret: str) -> dict:
        """Replace this node's credential with ``new_secret`` (its contribution is kept)."""
        from dume_dist.distributed.genesis import node_credential_record

        hashed, key = node_credential_record(self.name, self.domain, new_secret)
        out = self._json(
            "POST", "/v1/node/credential", {"credential_hash": hashed, "public_key": key}
        )
        self._secret = new_secret
        return out

    def upload(self, kind: str, data: bytes) -> str:
        """Send ``data`` as a resumable upload; returns its id once the server has all of it."""
        meta = {"kind": kind, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        state = self._json("POST", "/v1/node/uploads", meta)
        upload, received = state["upload"], state["received"]
        chunk = min(self.chunk_bytes, int(state.get("chunk_bytes", self.chunk_bytes)))
        restarts = 0
        while received < len(data):
            piece = data[received : received + chunk]
            path = f"/v1/node/uploads/{upload}?offset={received}"
            status, body = self._send("PUT", path, piece, kind, ok=(200, 404, 409))
            if status == 404:  # the server lost the staged part (e.g. its replica moved): again
                restarts += 1
                if restarts > 3:
                    raise ValueError(f"coordinator API: upload {upload} keeps disappearing")
                received = self._json("POST", "/v1/node/uploads", meta)["received"]
                continue
            received = int(body["received"])  # 409: the server's offset (a lost response)
        return upload

    # -- plumbing ----------------------------------------------------------------------------

    def _json(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = b"" if payload is None else json.dumps(payload, sort_keys=True).encode()
        return self._send(method, path, body, "requests")[1]

    def _send(self, method: str, path: str, body: bytes, kind: str, ok=(200,), stream=False):
        """(status, parsed JSON body, or the response when ``stream``), retrying what may pass."""
        path = quote(path, safe="/?=&")  # signed as sent: requests will not re-quote it
        deadline = time.monotonic() + self.retry_s
        delay = 0.5
        while True:
            headers = signing.sign_request(self.name, self.domain, self._secret, method, path, body)
            if body or method != "GET":
                headers["content-type"] = (
                    "application/json" if kind == "requests" else "application/octet-stream"
                )
            self.sent[kind] += len(body)
            try:
                resp = self._http().request(method, self.url + path, data=body, headers=headers,
                                            timeout=self.timeout_s, stream=stream,
                                            verify=self.ca_cert or True)  # fmt: skip
            except OSError as exc:  # requests' ConnectionError and Timeout are OSErrors
                # a certificate that does not verify is not going to get better
                retry = "SSL" not in type(exc).__name__
                error = ValueError(f"coordinator unreachable at {self.url}: {_reason(exc)}")
            else:
                if resp.status_code in ok:
                    return resp.status_code, resp if stream else _body(resp)
                retry, error = self._refusal(resp)
            if not retry or time.monotonic() + delay > deadline:
                raise error
            time.sleep(delay)
            delay = min(delay * 2, 8.0)

    @staticmethod
    def _refusal(resp) -> tuple[bool, Exception]:
        """(whether to retry, the error to raise) for a response that is not a success."""
        body = _body(resp)
        message = body.get("error") or f"HTTP {resp.status_code}"
        if resp.status_code == 401:
            return bool(body.get("retry")), PermissionError(f"coordinator API: {message}")
        if resp.status_code in TRANSIENT_STATUS:
            return True, ValueError(f"coordinator API unavailable: {message}")
        if resp.status_code == 429:
            return False, PermissionError(f"coordinator API: {message}")
        return False, ValueError(f"coordinator API: {message}")

    def _download(self, path: str, out: Path, want: dict) -> None:
        _, resp = self._send("GET", path, b"", "requests", stream=True)
        h, size = hashlib.sha256(), 0
        out.parent.mkdir(parents=True, exist_ok=True)
        with resp, open(out, "wb") as f:
            for chunk in resp.iter_content(1 << 20):
                size += len(chunk)
                if size > want["size"]:
                    break
                h.update(chunk)
                f.write(chunk)
        self.received += size
        if size != want["size"] or h.hexdigest() != want["sha256"]:
            raise ValueError(f"backbone file {out.name} from the coordinator fails its checksum")

    def _http(self):
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Caused by ", "Failed to establish"):
        if marker in text:
            return text[text.index(marker) :].rstrip(")")
    return text


def _body(resp) -> dict:
    try:
        out = resp.json()
    except ValueError:
        return {"error": resp.text[:200] if resp.text else f"HTTP {resp.status_code}"}
    return out if isinstance(out, dict) else {"error": "unexpected response"}
