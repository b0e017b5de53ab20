import os
import stat

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


#: set by .ci/unprivileged: there a test that needs an unprivileged user fails, not skips
REQUIRE_UNPRIVILEGED = os.environ.get("RETENTION_REQUIRE_UNPRIVILEGED") == "1"


def pytest_collection_modifyitems(items):
    """Mark ``unprivileged`` the tests that need a user who cannot write everywhere,
    so that .ci/unprivileged can pick them out and run them as such a user."""
    for item in items:
        if "read_only_folder" in item.fixturenames:
            item.add_marker(pytest.mark.unprivileged)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this user cannot write to; skips where the user writes anyway (root),
    fails there instead under RETENTION_REQUIRE_UNPRIVILEGED=1."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            reason = ("this user writes into read-only folders (root): `bash .ci/unprivileged "
                      ".venv/bin/python` runs these tests as a user who cannot")
            if REQUIRE_UNPRIVILEGED:
                pytest.fail(reason)
            pytest.skip(reason)
        yield folder
    finally:
        folder.chmod(stat.S_IRWXU)
