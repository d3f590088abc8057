"""dar: Dynamic Attention Rebalancing kernels for multi-image composition models."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def subpackages(root: str, dotted: str) -> dict[str, str]:
    """Map the top-level folder ``root`` (and its subfolders) onto the package ``dotted``."""
    found = {dotted: root}
    for pkg in find_packages(where=root):
        found[f"{dotted}.{pkg}"] = f"{root}/{pkg.replace('.', '/')}"
    return found


# kernels/ and bindings/ are installed as dar.kernels and dar.bindings: nothing named plain
# "kernels" or "bindings" lands in site-packages.
package_dir = {"dar": "dar", **subpackages("kernels", "dar.kernels"), **subpackages("bindings", "dar.bindings")}
packages = ["dar", *[f"dar.{p}" for p in find_packages(where="dar")], *[p for p in package_dir if p != "dar"]]

extras = {
    "test": ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4"],
    "diffusers": ["diffusers>=0.36", "transformers>=5.0", "accelerate", "pillow", "matplotlib"],
    "transformers": ["transformers>=5.0"],
    "eval": ["pyyaml", "tqdm", "matplotlib", "scipy", "openai>=1.0", "pillow"],
    "bench": ["pytest-benchmark>=4", "matplotlib", "diffusers>=0.36", "transformers>=5.0"],
}
extras["all"] = sorted({dep for deps in extras.values() for dep in deps})

setup(
    name="dar-attention",
    version="0.1.0",
    description="Dynamic Attention Rebalancing: fused Triton kernels and drop-in bindings for multi-image composition",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(set(packages)),
    package_dir=package_dir,
    install_requires=["torch>=2.5", "numpy", "einops", "triton>=3.0; platform_system == 'Linux'"],
    extras_require=extras,
    entry_points={"console_scripts": ["dar=dar.cli:main"]},
    license="Apache-2.0",
)
