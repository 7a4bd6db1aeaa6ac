"""Print what a ComfyUI host's requirements need beyond this venv: the requirement lines (and, once those are
in SITE, their own dependencies) that neither the venv nor SITE satisfies. scripts/setup.sh installs them with
`pip install --no-deps --target SITE` until nothing is printed, so another host's pins never change the venv.

    python scripts/host_site.py HOST/requirements.txt SITE

Left out: torch and torchvision (the venv's pinned build serves every host), torchaudio (scripts/setup.sh pins
the release known to import beside that torch), and the host's own template thumbnails
(comfyui-workflow-templates-media-*, ~430 MB, which no test reads)."""
from __future__ import annotations

import importlib.metadata as md
import sys

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

SKIP_PREFIXES = ("torch", "torchvision", "torchaudio", "comfyui-workflow-templates-media-")


def _skipped(name: str) -> bool:
    name = canonicalize_name(name)
    return name in SKIP_PREFIXES[:3] or name.startswith(SKIP_PREFIXES[3])


def _installed(site: str) -> dict[str, str]:
    versions = {}
    for dist in md.distributions(path=sys.path):  # the venv
        versions.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    for dist in md.distributions(path=[site]):  # SITE shadows the venv (it comes first on PYTHONPATH)
        versions[canonicalize_name(dist.metadata["Name"])] = dist.version
    return versions


def missing(requirements: list[str], site: str) -> list[str]:
    have = _installed(site)
    env = default_environment()
    wanted = list(requirements)
    for dist in md.distributions(path=[site]):
        wanted += [r for r in (dist.requires or []) if "extra ==" not in r]
    out = []
    for line in wanted:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if _skipped(req.name) or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        version = have.get(canonicalize_name(req.name))
        if version is None or (req.specifier and not req.specifier.contains(version, prereleases=True)):
            spec = f"{req.name}{req.specifier}"
            if spec not in out:
                out.append(spec)
    return out


def main(argv: list[str]) -> int:
    requirements_file, site = argv
    lines = [line.split("#")[0].strip() for line in open(requirements_file, encoding="utf-8")]
    for spec in missing([line for line in lines if line], site):
        print(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
