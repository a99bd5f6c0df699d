"""The README's minimal values file is a tested value set (values/readme.yaml), so the
`helm install` it shows renders, lints, validates and passes checkov like the others."""

import re

from conftest import REPO, VALUES_DIR


def test_the_readme_values_file_is_the_tested_value_set():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(# my-values\.yaml\n.*?)```", readme, re.S)
    assert len(blocks) == 1, "the README shows one minimal values file"
    assert blocks[0] == (VALUES_DIR / "readme.yaml").read_text()
