"""Co-batching proofs kept across starts: found only under the same key, sizes, steps and code."""

from __future__ import annotations

import json

from app.worker import proofs
from app.worker.proofs import ProofStore, proof_name

KEY = "rk1-" + "a" * 64
VERDICTS = [
    {"model": "sameseed-tiny", "width": 64, "height": 64, "guided": True, "size": 2, "proven": True, "reason": "",
     "seconds": 0.2, "proven_at": "2026-11-27T12:00:00Z"},
    {"model": "sameseed-tiny", "width": 64, "height": 64, "guided": False, "size": 2, "proven": False,
     "reason": "image 0 (seed 0) of a batch of 2 at 64x64, guidance 0: latents differ", "seconds": 0.1,
     "proven_at": "2026-11-27T12:00:00Z"},
]


def test_a_kept_proof_comes_back_marked_cached_under_the_same_key_sizes_and_steps(tmp_path):
    store = ProofStore(tmp_path / "proofs")
    assert store.get(KEY, (2, 3, 4), 2) is None
    store.put(KEY, (2, 3, 4), 2, VERDICTS)
    assert store.get(KEY, (4, 3, 2), 2) == [{**v, "cached": True} for v in VERDICTS]  # sizes in any order
    assert [p.suffix for p in (tmp_path / "proofs").iterdir()] == [".json"]  # no temporary file left


def test_another_key_other_sizes_or_other_steps_prove_again(tmp_path):
    store = ProofStore(tmp_path)
    store.put(KEY, (2, 3, 4), 2, VERDICTS)
    assert store.get("rk1-" + "b" * 64, (2, 3, 4), 2) is None
    assert store.get(KEY, (2, 3), 2) is None
    assert store.get(KEY, (2, 3, 4), 3) is None


def test_a_change_to_the_cobatched_code_proves_again(tmp_path, monkeypatch):
    store = ProofStore(tmp_path)
    store.put(KEY, (2,), 2, VERDICTS)
    monkeypatch.setattr(proofs, "code_digest", lambda: "0" * 64)
    assert store.get(KEY, (2,), 2) is None


def test_a_damaged_or_foreign_file_is_proven_again_not_trusted(tmp_path):
    store = ProofStore(tmp_path)
    (tmp_path / proof_name(KEY, (2,), 2)).write_text("{not json")
    assert store.get(KEY, (2,), 2) is None
    (tmp_path / proof_name(KEY, (2,), 2)).write_text(json.dumps({"reproducibility_key": "rk1-other", "verdicts": []}))
    assert store.get(KEY, (2,), 2) is None


def test_no_folder_keeps_nothing_and_an_unwritable_one_only_costs_a_proof(tmp_path):
    ProofStore(None).put(KEY, (2,), 2, VERDICTS)
    assert ProofStore(None).get(KEY, (2,), 2) is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    store = ProofStore(blocked / "proofs")  # a file where the folder should be: mkdir fails
    store.put(KEY, (2,), 2, VERDICTS)
    assert store.get(KEY, (2,), 2) is None

