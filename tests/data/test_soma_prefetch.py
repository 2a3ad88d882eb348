"""pretrain starts importing tiledbsoma in the background when a store is a SOMA experiment, and only then."""

from __future__ import annotations

import subprocess
import sys

from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores import is_soma_uri

PROBE = (
    "import sys, time; from sclabel_dist.data.stores import import_soma_in_background as f; "
    "f([sys.argv[1]]); time.sleep(3); print('tiledbsoma' in sys.modules)"
)


def test_only_a_soma_experiment_starts_the_import(tmp_path):
    soma, store = tmp_path / "exp", tmp_path / "store"
    soma.mkdir()
    (soma / "__tiledb_group.tdb").write_text("")
    store.mkdir()
    (store / fmt.INDEX_FILE).write_text("{}")
    assert is_soma_uri(str(soma)) and not is_soma_uri(str(store))
    for uri, imported in ((soma, "True"), (store, "False")):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, str(uri)], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == imported, out.stderr
