import os

import pytest

# pyrender picks its OpenGL platform at import time: headless OSMesa unless the user chose otherwise.
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")


@pytest.fixture(scope="session")
def builtin_clips(tmp_path_factory) -> str:
    """The built-in sequences rendered at 64x64 by the real pipeline: 2 sequences x 2 clips x 8 frames, K = 4,
    tracks every 4 pixels (and one view of each static built-in); the shard glob."""
    from tests.clip_shards import render_builtin_clips

    return render_builtin_clips(tmp_path_factory.mktemp("clips"))
