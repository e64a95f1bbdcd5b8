"""When a worker reads inputs ahead (`workers.lookahead.prefetching`): by default only where S3 is
not on this machine's loopback, where reads wait on the network rather than on the CPU the forward
pass needs; STEP1X_PREFETCH_INPUTS decides either way."""

import pytest

from core.settings import Settings
from workers.lookahead import prefetching


@pytest.mark.parametrize(("endpoint", "expected"), [
    ("http://127.0.0.1:8333", False), ("http://localhost:8333", False), ("http://[::1]:8333", False),
    ("http://seaweedfs:8333", True), ("https://s3.eu-west-3.amazonaws.com", True), ("http://10.0.0.7:9000", True),
    (None, True),  # boto3's default: AWS
])
def test_by_default_only_where_s3_is_not_on_loopback(tmp_path, endpoint, expected):
    assert prefetching(Settings(data_dir=tmp_path, s3_endpoint_url=endpoint)) is expected


@pytest.mark.parametrize("chosen", [True, False])
def test_the_setting_decides_either_way(tmp_path, chosen):
    for endpoint in ("http://127.0.0.1:8333", "https://s3.amazonaws.com"):
        assert prefetching(Settings(data_dir=tmp_path, s3_endpoint_url=endpoint, prefetch_inputs=chosen)) is chosen
