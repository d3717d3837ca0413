"""Prompt sources and the per-epoch safe/unsafe mix."""

from __future__ import annotations

import pytest

from fastgrpo.errors import DataError
from fastgrpo.prompts import PromptMixer, load_prompts


def test_text_and_csv(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("\ufeffone\n\n  two  \nthree\n", encoding="utf-8")
    assert load_prompts(str(txt)) == ["one", "two", "three"]
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('id,text\n1,"a, quoted prompt"\n2,plain\n3,\n', encoding="utf-8")
    assert load_prompts(str(csv_file), "text") == ["a, quoted prompt", "plain"]


@pytest.mark.parametrize("name, content, column, message", [
    ("missing.txt", None, "prompt", "not found"),
    ("empty.txt", b"\n  \n", "prompt", "holds no prompts"),
    ("latin1.txt", "caf\u00e9\n".encode("latin-1"), "prompt", "is not UTF-8 text"),
    ("cols.csv", b"id,text\n1,x\n", "prompt", "has no column 'prompt' (columns: id, text)"),
])
def test_errors_name_the_file(tmp_path, name, content, column, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_prompts(str(path), column)
    assert message in str(error.value) and name in str(error.value)


def test_builtin_prompts_load():
    assert len(load_prompts("builtin:tiny_safe.txt")) >= 4


def test_mix_is_deterministic_and_respects_the_fraction():
    safe = [f"safe {i}" for i in range(10)]
    unsafe = [f"unsafe {i}" for i in range(3)]
    mixer = PromptMixer(safe, unsafe, 0.25, 8, seed=1)
    first = mixer.epoch(0)
    again = PromptMixer(safe, unsafe, 0.25, 8, seed=1).epoch(0)
    assert first.prompts == again.prompts
    assert first.is_unsafe.sum().item() == 2
    assert [p.startswith("unsafe") for p in first.prompts] == first.is_unsafe.tolist()
    assert len(set(p for p in first.prompts if p.startswith("safe"))) == 6  # no repeats within a pass
    assert mixer.epoch(1).prompts != first.prompts
    assert PromptMixer(safe, unsafe, 0.25, 8, seed=2).epoch(0).prompts != first.prompts
    big = PromptMixer(safe, unsafe, 1.0, 7, seed=0).epoch(0)  # more unsafe prompts than the pool: cycles
    assert sorted(set(big.prompts)) == sorted(unsafe) and big.is_unsafe.all()


@pytest.mark.parametrize("content, message", [
    ('prompt,categories\n"a cat, sitting,sexual\nb dog,violence\n', "not valid CSV"),  # the quote never closes
    ('prompt,categories\n"line one\nline two",sexual\nok,violence\n', "spans several lines"),
])
def test_a_csv_prompt_that_spans_lines_is_refused(tmp_path, content, message):
    path = tmp_path / "i2p.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as raised:
        load_prompts(str(path))
    assert "\n" not in str(raised.value)
    path.write_text('prompt,categories\n"a cat, sitting",sexual\nb dog,violence\n', encoding="utf-8")
    assert load_prompts(str(path)) == ["a cat, sitting", "b dog"]  # a quoted comma is fine


def test_eval_refuses_an_unclosed_quote_in_one_line(tiny_pipeline_dir, tmp_path, capsys):
    from fastgrpo import cli

    path = tmp_path / "i2p.csv"
    path.write_text('prompt,categories\n"a cat, sitting,sexual\nb dog,violence\n', encoding="utf-8")
    assert cli.main(["eval", "--model", str(tiny_pipeline_dir), "--prompts", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not valid CSV" in err
