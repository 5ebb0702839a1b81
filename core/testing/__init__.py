"""Test support shipped with Strongroom: the backend contract suite.

Every backend runs the same suite. Subclass `BackendContract` in a test module and
provide the `keystore` and `backend_name` fixtures::

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def keystore(self, tmp_path): ...
        @pytest.fixture
        def backend_name(self): return "hsm"
"""

from .contract import BackendContract

__all__ = ["BackendContract"]
