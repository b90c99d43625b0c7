"""Test-session environment: no test may reach a public host, and no GPU is assumed.

AWS_ENDPOINT_URL points at a loopback port so a test that forgets to start the local S3
server fails fast instead of talking to AWS; fixtures that start one override it."""

import os

os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: connection refused, never AWS
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
