"""dar: Dynamic Attention Rebalancing kernels for multi-image composition models."""

from setuptools import find_packages, setup


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

# Version bounds (here and in pyproject.toml's dependencies) are claims, and CI checks each one (.ci/run,
# compatibility stage in .ci/compat.py): every lower bound is a release CI installs and tests, alongside the exact
# versions of .ci/constraints.txt and the newest release. An upper bound would exclude a release that breaks us;
# none does today.
# - torch 2.5: BAGEL pins 2.5.1 and OmniGen2 2.6.0; installing dar there must not upgrade torch. CI runs the core,
#   varlen and model bindings on 2.5.1 (Python 3.10), everything on 2.14.1 and the core, kernels and bindings
#   on 2.15.0.
# - triton: not a requirement. CUDA builds of torch bring the triton they were built with (the ecosystem's way:
#   declaring it again would pull a ~1 GB wheel into CPU-only installs, where the kernels cannot run anyway);
#   without it the triton backend is unavailable and dar.backends / `dar info` say why. The test extra names it,
#   since the kernel tests run the kernels under Triton's CPU interpreter.
# - diffusers 0.38: 0.36 and 0.37 lay out QwenImage text differently (txt_seq_lens) and fail the binding tests.
# - openai 1.55.3: older releases pass `proxies` to httpx, which httpx 0.28 removed (every judge call fails).
extras = {
    "test": ["pytest", "hypothesis", "pytest-benchmark", "pytest-xdist", "triton; platform_system == 'Linux'"],
    "diffusers": ["diffusers>=0.38", "transformers>=5.0", "accelerate", "pillow", "matplotlib"],
    "transformers": ["transformers>=5.0"],
    "eval": ["pyyaml", "tqdm", "matplotlib", "scipy", "openai>=1.55.3", "pillow"],
    "bench": ["pytest-benchmark", "matplotlib", "diffusers>=0.38", "transformers>=5.0"],
}
extras["all"] = sorted({dep for deps in extras.values() for dep in deps})

# Name, version, description, Python and install requirements are in pyproject.toml's [project] (the Comfy Registry
# reads them there too); the extras stay here, next to their reasons.
setup(
    packages=sorted(set(packages)),
    package_dir=package_dir,
    extras_require=extras,
)
