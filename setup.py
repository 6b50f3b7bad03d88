"""Install-time hooks: none. The C++ CPU kernels in csrc/ are compiled just in time, on first use, by
fastexplain/ops/cpu.py (torch.utils.cpp_extension.load, cached under TORCH_EXTENSIONS_DIR). An ahead-of-time
build here would need torch at build time, i.e. `pip install --no-build-isolation`, and with build isolation pip
would install a second torch into the build environment; the JIT build keeps `pip install -e .` working.
See docs/cpu-kernels.md."""
from setuptools import setup

setup()
