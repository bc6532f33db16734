"""A torchrun rank's results travel to rank 0 as bytes (JSON + safetensors), never as a pickle,
and rank 0 checks them field by field."""

import json
import pickle

import numpy as np
import pytest

from sdml_ext.engine.distributed import decode_payload, decode_result, encode_payload, encode_result
from sdml_ext.engine.records import EpochStats, ModalityResult


def payload():
    result = ModalityResult(
        name="m0", index=0, model_options={"input_dim": 3}, preprocess="none", lr=1e-3, seed=1,
        state={"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, best_epoch=1, selection="last epoch",
        history=[EpochStats("m0", 1, 1.0, 0.5, 0.5, float("nan"), float("nan"), float("nan"), True)],
        time_s=1.0, cpu_s=1.0, state_bytes=24,
    )
    return {"rank": 1, "host": "h", "device": "cpu", "wall_s": 2.5, "peak_rss_bytes": 10,
            "device_peak_bytes": {}, "results": [encode_result(result)]}


def test_a_payload_round_trips_without_pickle():
    data = encode_payload(payload())
    assert b"\x80\x04" not in data[:2]  # not a pickle stream
    back = decode_payload(data)
    assert back["rank"] == 1 and back["wall_s"] == 2.5
    result = decode_result(back["results"][0])
    assert result.name == "m0" and np.array_equal(result.state["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("tamper,word", [
    (lambda d: d[:-3], "sizes"),
    (lambda d: d[:5], "truncated"),
    (lambda d: pickle.dumps({"rank": 1}), "truncated"),
])
def test_a_malformed_payload_is_refused(tamper, word):
    with pytest.raises(ValueError, match=word):
        decode_payload(tamper(encode_payload(payload())))


def test_a_payload_with_a_wrong_field_is_refused_naming_it():
    data = encode_payload(payload())
    n = int.from_bytes(data[:8], "little")
    record = json.loads(data[8 : 8 + n])
    record["rank"] = "zero"
    head = json.dumps(record).encode()
    with pytest.raises(ValueError, match="rank"):
        decode_payload(len(head).to_bytes(8, "little") + head + data[8 + n :])
