"""Shared fixtures: a loopback S3 server; the inference commands' session fixtures (a tiny dataset
and checkpoint, built once per session for every module that uses them)."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.inference_fixtures"]

os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible server (moto) on loopback with an empty bucket ``runs``.

    Yields ``make_uri(prefix)``, which gives ``s3://runs/<prefix>?endpoint_override=...``:
    a storage path that pyarrow (and so Ray) resolves to this server. Credentials are set in
    this process's environment; subprocesses and Ray workers started from it inherit them.
    """
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    with pytest.MonkeyPatch.context() as mp:
        for key, value in S3_ENV.items():
            mp.setenv(key, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        fs = pafs.S3FileSystem(
            endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
            allow_bucket_creation=True,
        )  # fmt: skip
        fs.create_dir("runs")
        try:
            yield lambda prefix: f"s3://runs/{prefix}?{query}"
        finally:
            server.stop()
