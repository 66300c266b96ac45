"""A real S3 API on 127.0.0.1 for tests: moto's threaded server, a bucket, teardown.

Reusable from any test module (store tests, Ray tests: s3fs clients in other
processes reach it through `endpoint_url` and `storage_options`):

    from s3server import S3Server            # tests/ is on sys.path under pytest

    with S3Server() as s3:
        store = ObjectStore(s3.url("my-prefix"), s3.storage_options)

or use the session-scoped `s3_server` fixture defined here (import it into a test
module or a conftest). Credentials are dummies; moto accepts any unless inside
`auth_required()`.
"""

import contextlib
import logging
import os
import urllib.request
import uuid

import pytest
from moto.server import ThreadedMotoServer

DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class S3Server:
    """moto's S3 on an ephemeral loopback port with one bucket created."""

    def __init__(self, bucket: str = "dume-test"):
        self.bucket = bucket
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._saved_env: dict[str, str | None] = {}
        self.endpoint_url = ""

    @property
    def storage_options(self) -> dict:
        # No region_name in client_kwargs: with one, moto's bucket creation fails.
        return {
            "endpoint_url": self.endpoint_url,
            "key": DUMMY_ENV["AWS_ACCESS_KEY_ID"],
            "secret": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        }

    def url(self, prefix: str | None = None) -> str:
        """s3://bucket/<prefix>; a fresh random prefix when none is given."""
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:12]}"

    def start(self) -> "S3Server":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        for name, value in DUMMY_ENV.items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self._make_bucket()
        return self

    def _make_bucket(self) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        fs.mkdir(self.bucket)

    @contextlib.contextmanager
    def auth_required(self):
        """Make moto check credentials (dummy keys then fail with 403) inside the block."""
        self._set_auth_count("0")
        try:
            yield
        finally:
            self._set_auth_count("inf")

    def _set_auth_count(self, count: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=count.encode(),
            headers={"Content-Type": "text/plain"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        self._server.stop()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A running S3Server for the whole session (bucket `dume-test`)."""
    with S3Server() as server:
        yield server
