"""Corpus splits: disjoint, deterministic, domain-separated, built from a small fake stdlib tree."""

from pathlib import Path

import pytest

from quailora.errors import QuailoraInputError
from reference import corpora


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    for i in range(60):
        module = root / f"pkg{i % 3}" / f"mod{i}.py"
        module.parent.mkdir(parents=True, exist_ok=True)
        doc = f"Module {i} explains something at length. " * 8
        fdoc = f"Function f{i} explains something else at length. " * 8
        module.write_text(f'"""{doc}"""\n\n\ndef f{i}(x):\n    """{fdoc}"""\n    return x + {i}\n')
    (root / "test").mkdir()
    (root / "test" / "test_secret.py").write_text("SECRET_TEST_FILE = 1\n")
    (root / "bad.py").write_bytes(b"\xff\xfe not utf-8")
    return root


TOPICS = {f"topic{i}": "\n\n".join(f"Paragraph {j} of topic {i}. " * 20 for j in range(12)) for i in range(6)}


def test_splits_are_disjoint_deterministic_and_complete(fake_stdlib: Path) -> None:
    splits = corpora.build_splits(fake_stdlib, TOPICS)
    assert set(splits) == set(corpora.SPLITS)
    assert all(splits[name] for name in ("pretrain-train", "finetune-train")), {
        k: len(v) for k, v in splits.items()
    }
    seen: dict[str, str] = {}
    for name, docs in splits.items():
        for doc in docs:
            assert doc not in seen, f"document in both {seen[doc]} and {name}"
            seen[doc] = name
    assert corpora.build_splits(fake_stdlib, TOPICS) == splits
    everything = "".join(seen)
    assert "SECRET_TEST_FILE" not in everything  # test directories are excluded


def test_domains_are_separated_by_file(fake_stdlib: Path) -> None:
    splits = corpora.build_splits(fake_stdlib, TOPICS)
    code = "".join(splits["pretrain-train"] + splits["pretrain-validation"])
    prose = (
        splits["calibration"]
        + splits["finetune-train"]
        + splits["finetune-validation"]
        + splits["finetune-test"]
    )
    assert any("Paragraph" in doc for doc in prose)  # pydoc topics are fine-tuning prose
    for doc in prose:
        if doc.startswith("Module"):
            module = doc.split()[1]
            assert f"return x + {module}\n" not in code, (
                f"docstring of module {module} was also pretrained on"
            )


def test_chunk_paragraphs_keeps_all_text() -> None:
    text = "\n\n".join(" ".join([f"p{i}"] * 100) for i in range(10))
    chunks = corpora.chunk_paragraphs(text, target=500)
    assert len(chunks) > 1
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")


def test_unknown_split_is_rejected_before_any_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUAILORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(QuailoraInputError, match="'finetune-dev'"):
        corpora.load_split("finetune-dev")
    assert not (tmp_path / "cache").exists()
