"""`python -m piip_llava.data.tokenizer`: a tokenizer trained on a LLaVA file's text."""
import json

from piip_llava.data.tokenizer import load_tokenizer, main


def test_tokenizer_cli_trains_on_llava_text(tmp_path):
    records = [{"id": str(i), "conversations": [
        {"from": "human", "value": "<image>\nWhat word is written in zorblax letters?"},
        {"from": "gpt", "value": "zorblax quuxifier"}]} for i in range(1000)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "tok"
    assert main(["--out", str(out), "--vocab-size", "512", "--from-llava", str(data)]) == 0
    tok = load_tokenizer(str(out))
    assert len(tok) == 512 and tok.pad_token_id == tok.unk_token_id == 0 and tok.bos_token_id == 1
    ids = tok("zorblax quuxifier", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "zorblax quuxifier"
    assert len(ids) <= 4  # the task's own words became whole pieces
    default = tmp_path / "tok_default"
    assert main(["--out", str(default), "--vocab-size", "512"]) == 0
    assert len(load_tokenizer(str(default))("zorblax quuxifier", add_special_tokens=False).input_ids) > len(ids)
