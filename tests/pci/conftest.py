from __future__ import annotations

import pytest

from vmsi_server.pci.config_space import ConfigSpace
from vmsi_server.pci.igbvf_layout import igbvf_config_space


@pytest.fixture
def space() -> ConfigSpace:
    return igbvf_config_space()
