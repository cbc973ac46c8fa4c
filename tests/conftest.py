"""Shared fixtures: the real starter model, provisioned once per machine into the sad-ray cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def cache_dir() -> Path:
    return Path(os.environ.get("SAD_RAY_CACHE", "~/.cache/sad-ray")).expanduser()


@pytest.fixture(scope="session")
def starter_dir() -> Path:
    from sad_ray.models.starter import provision_starter

    return provision_starter(cache_dir())


@pytest.fixture(scope="session")
def starter_tokenizer(starter_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(starter_dir)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on loopback (moto's), with this process's environment pointing pyarrow and any
    Ray node started after it at it (AWS_ENDPOINT_URL and test credentials); yields a URI of a fresh bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "sad-ray-test",
           "AWS_SECRET_ACCESS_KEY": "sad-ray-test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import pyarrow.fs as pafs

        fs, _ = pafs.FileSystem.from_uri("s3://sad-ray-test?allow_bucket_creation=true")  # reads AWS_ENDPOINT_URL
        fs.create_dir("sad-ray-test")
        yield "s3://sad-ray-test"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
