import os

# pyrender picks its OpenGL platform at import time: headless OSMesa unless the user chose otherwise.
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
