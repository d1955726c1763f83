"""Print every dependency pyproject.toml declares, pinned to its lower bound (`name==version`),
so that the oldest-supported test environment is exactly what the package claims to support.
torch is left out: CI installs the one CPU build it has before anything else."""
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]

for requirement in dependencies:
    match = re.match(r"\s*([A-Za-z0-9_.\-]+).*?>=\s*([^,;\s]+)", requirement)
    if match is None:
        sys.exit(f"{requirement!r} declares no lower bound (>=): declare the oldest version that is tested")
    name, low = match.groups()
    if name != "torch":
        print(f"{name}=={low}")
