"""Keras model files read without TensorFlow (lstm.load_keras) and Keras 3 weights written back.

Every file in keras_golden/models/manifest.json (the shared directory and the copy under
tests/data) is loaded and run on its `<model>.io.npz` inputs, matching Keras' outputs within
the manifest's tolerance; stateful-streaming models are called once per step, comparing the
outputs and the carried states after each call. Synthetic files in each format cover the
layers the golden files do not (Masking, Bidirectional, GRU, SimpleRNN, TimeDistributed,
Dropout, stateful, functional chains).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

import lstm  # noqa: E402
from lstm import layers  # noqa: E402

HERE = Path(__file__).parent
MODEL_DIRS = [HERE.parent.parent / "shared" / "keras_golden" / "models", HERE / "data" / "keras_golden" / "models"]


def manifest_entries():
    entries = []
    for directory in MODEL_DIRS:
        manifest = directory / "manifest.json"
        if not manifest.exists():
            continue
        data = json.loads(manifest.read_text())
        for entry in data["files"]:
            if (directory / entry["file"]).exists():
                entries.append(pytest.param(directory, entry, data, id=f"{directory.parent.parent.name}/{entry['file']}"))
    return entries


ENTRIES = manifest_entries()


def load_entry(directory: Path, entry: dict):
    if entry.get("companion"):  # a weights-only file: the architecture is the companion JSON
        return lstm.load_keras(directory / entry["companion"], weights=directory / entry["file"])
    return lstm.load_keras(directory / entry["file"])


def check_close(ours, expected: np.ndarray, tolerance: dict, what: str) -> float:
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert ours.shape == expected.shape, f"{what}: shape {ours.shape} != {expected.shape}"
    bound = tolerance.get("atol", 1e-5) + tolerance.get("rtol", 1e-5) * float(np.abs(expected).max(initial=0.0))
    error = float(np.abs(ours.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))
    assert error <= bound, f"{what}: max |ours - keras| = {error:.3g} > {bound:.3g}"
    return error


def stateful_layers(model):
    return [m for m in model.modules() if isinstance(m, layers.RNN) and m.stateful]


def run_entry(model, arrays: dict, tolerance: dict, what: str) -> float:
    """Runs the io inputs through the model as Keras did; returns the max error."""
    inputs, outputs = arrays["inputs"], arrays["outputs"]
    carried = stateful_layers(model)
    if not carried:
        with torch.no_grad():
            return check_close(model(inputs), outputs, tolerance, f"{what} outputs")
    # stateful streaming: call k gets inputs[k]; outputs[k] and the states after call k
    assert inputs.shape[0] == outputs.shape[0], f"{what}: one output per call expected"
    model.reset_state()
    worst = 0.0
    for k in range(inputs.shape[0]):
        with torch.no_grad():
            out = model(inputs[k])
        worst = max(worst, check_close(out, outputs[k], tolerance, f"{what} call {k} outputs"))
        if len(carried) == 1:
            for index, key in enumerate(("state_h", "state_c")):
                if key in arrays and index < len(carried[0].states):
                    worst = max(worst, check_close(carried[0].states[index], arrays[key][k], tolerance,
                                                   f"{what} call {k} {key}"))
    return worst


@pytest.mark.parametrize("directory, entry, manifest", ENTRIES)
def test_keras_model_file(directory, entry, manifest):
    model = load_entry(directory, entry)
    assert isinstance(model, lstm.Sequential)
    arrays = dict(np.load(directory / entry["io"]))
    tolerance = entry.get("tolerance") or manifest.get("models", {}).get(entry.get("model"), {}).get("tolerance") or {}
    run_entry(model, arrays, tolerance, entry["file"])
    if stateful_layers(model):  # a second pass after reset_state gives the same stream
        run_entry(model, arrays, tolerance, entry["file"] + " (after reset_state)")
    if "mask" in arrays and not stateful_layers(model):  # the mask the first masking layer makes
        x = torch.as_tensor(arrays["inputs"])
        for layer in model.layers:
            mask = layer.compute_mask(x, None) if hasattr(layer, "compute_mask") else None
            if mask is not None:
                assert np.array_equal(mask.numpy(), arrays["mask"].astype(bool)), f"{entry['file']}: mask"
                break
            x = layer(x)


def test_manifest_files_found():
    files = {entry.values[1]["file"] for entry in ENTRIES}
    assert {"sentiment.keras", "sentiment.weights.h5", "sentiment.tf_keras.h5", "forecaster.keras"} <= files


def test_loaded_model_is_eval_and_float32():
    model = lstm.load_keras(MODEL_DIRS[-1] / "sentiment.keras")
    assert not model.training
    assert [type(m).__name__ for m in model.layers] == ["InputLayer", "Embedding", "LSTM", "Dense"]
    assert model.layers[1].mask_zero and all(p.dtype == torch.float32 for p in model.parameters())


# ----- writing Keras 3 weights ------------------------------------------------------------------
def h5_layout(path) -> dict:
    layout = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: layout.__setitem__(
            name, tuple(obj.shape) if isinstance(obj, h5py.Dataset) else dict(obj.attrs)))
    return layout


def test_save_keras_weights_matches_keras_layout(tmp_path):
    source = MODEL_DIRS[-1]
    model = lstm.load_keras(source / "sentiment.json", weights=source / "sentiment.weights.h5")
    target = tmp_path / "ours.weights.h5"
    lstm.save_keras_weights(model, target)
    assert h5_layout(target) == h5_layout(source / "sentiment.weights.h5")
    with h5py.File(target, "r") as ours, h5py.File(source / "sentiment.weights.h5", "r") as keras:
        for name in ("layers/embedding/vars/0", "layers/lstm/cell/vars/0", "layers/lstm/cell/vars/1",
                     "layers/lstm/cell/vars/2", "layers/dense/vars/0", "layers/dense/vars/1"):
            assert ours[name].dtype == keras[name].dtype
            assert np.array_equal(ours[name][()], keras[name][()])
    again = lstm.load_keras(source / "sentiment.json", weights=target)
    for a, b in zip(model.get_weights(), again.get_weights()):
        assert np.array_equal(a, b)
    x = np.load(source / "sentiment.io.npz")["inputs"]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_save_keras_weights_round_trip_changed_weights(tmp_path):
    source = MODEL_DIRS[-1]
    model = lstm.load_keras(source / "sentiment.json", weights=source / "sentiment.weights.h5")
    rng = np.random.default_rng(0)
    model.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in model.get_weights()])
    lstm.save_keras_weights(model, tmp_path / "w.weights.h5")
    again = lstm.load_keras(source / "sentiment.json", weights=tmp_path / "w.weights.h5")
    for a, b in zip(model.get_weights(), again.get_weights()):
        assert np.array_equal(a, b)


def test_save_single_layers_keras3_layout(tmp_path):
    torch.manual_seed(0)
    for layer, expected in [
        (layers.LSTM(5, input_dim=3), {"cell/vars/0": (3, 20), "cell/vars/1": (5, 20), "cell/vars/2": (20,)}),
        (layers.GRU(4, input_dim=2), {"cell/vars/0": (2, 12), "cell/vars/1": (4, 12), "cell/vars/2": (2, 12)}),
        (layers.SimpleRNN(3, input_dim=2), {"cell/vars/0": (2, 3), "cell/vars/1": (3, 3), "cell/vars/2": (3,)}),
        (layers.Bidirectional(layers.LSTM(2), input_shape=(None, 3)),
         {"forward_layer/cell/vars/0": (3, 8), "backward_layer/cell/vars/2": (8,)}),
    ]:
        path = tmp_path / f"{type(layer).__name__}.weights.h5"
        lstm.save_keras_weights(layer, path)
        layout = h5_layout(path)
        for name, shape in expected.items():
            assert layout[name] == shape, (type(layer).__name__, name)
        fresh = type(layer).from_config(layer.get_config())
        lstm.load_keras_weights(fresh, path)
        for a, b in zip(layer.get_weights(), fresh.get_weights()):
            assert np.array_equal(a, b)


# ----- synthetic files of the other kinds, each format ------------------------------------------
def _policy(dtype="float32"):
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype}, "registered_name": None}


def keras3_entry(layer) -> dict:
    """A Keras-3-style config entry (module keys, DTypePolicy dtype) for one of our layers."""
    config = json.loads(json.dumps(layer.get_config()))
    if "dtype" in config and not isinstance(layer, layers.InputLayer):
        config["dtype"] = _policy(config["dtype"])
    for key in ("layer", "backward_layer"):
        if isinstance(config.get(key), dict):
            inner = config[key]["config"]
            inner["dtype"] = _policy(inner["dtype"])
            config[key] = {"module": "keras.layers", "class_name": config[key]["class_name"], "config": inner,
                           "registered_name": None}
    if isinstance(layer, layers.Bidirectional):  # Keras 3 writes the forward sub-layer and the backward one
        forward = json.loads(json.dumps(layer.forward_layer.get_config()))
        backward = json.loads(json.dumps(layer.backward_layer.get_config()))
        for c in (forward, backward):
            c["dtype"] = _policy(c["dtype"])
            c.pop("implementation", None)
        config["layer"] = {"module": "keras.layers", "class_name": "LSTM", "config": forward}
        config["backward_layer"] = {"module": "keras.layers", "class_name": "LSTM", "config": backward}
    if isinstance(layer, layers.RNN):
        config.pop("implementation", None)
    return {"module": "keras.layers", "class_name": type(layer).__name__, "config": config, "registered_name": None}


def tf_keras_entry(layer) -> dict:
    config = json.loads(json.dumps(layer.get_config()))
    if isinstance(layer, layers.RNN):
        config["time_major"] = False
    if isinstance(layer, layers.InputLayer):
        config["batch_input_shape"] = config.pop("batch_shape")
    if isinstance(layer, layers.Bidirectional):
        config["layer"]["config"]["time_major"] = False
        config["layer"]["config"]["name"] = "lstm"
    return {"class_name": type(layer).__name__, "config": config}


def tf_keras_weight_names(layer) -> list:
    name = layer.name
    if isinstance(layer, layers.Bidirectional):
        inner = [f"{name}/{d}_lstm/lstm_cell/{w}:0" for d in ("forward", "backward")
                 for w in ("kernel", "recurrent_kernel", "bias")]
        return inner
    if isinstance(layer, layers.RNN):
        return [f"{name}/{layer.cell.name}/{w}:0" for w in ("kernel", "recurrent_kernel", "bias")]
    if isinstance(layer, layers.TimeDistributed):
        return [f"{name}/kernel:0", f"{name}/bias:0"]
    if isinstance(layer, layers.Embedding):
        return [f"{name}/embeddings:0"]
    if isinstance(layer, layers.Dense):
        return [f"{name}/kernel:0", f"{name}/bias:0"]
    return []


def write_keras_zip(path, top: dict, model) -> None:
    weights = Path(str(path) + ".tmp.weights.h5")
    lstm.save_keras_weights(model, weights)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps(top))
        archive.write(weights, "model.weights.h5")
    weights.unlink()


def write_legacy_h5(path, top: dict, model, version: str, functional: bool) -> None:
    entries = [m for m in model.layers if functional or not isinstance(m, layers.InputLayer)]
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(top)
        f.attrs["keras_version"] = version
        f.attrs["backend"] = "tensorflow"
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = [m.name.encode() for m in entries]
        for m in entries:
            group = weights.create_group(m.name)
            names = tf_keras_weight_names(m)
            if version.startswith("3"):
                names = [f"{model.name}/" + n.removesuffix(":0") for n in names]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for n, array in zip(names, m.get_weights()):
                group.create_dataset(n, data=array)
        weights.create_group("top_level_model_weights").attrs["weight_names"] = []


def functional_config(model, entry_fn, keras3: bool) -> dict:
    entries, previous = [], None
    for m in model.layers:
        entry = entry_fn(m)
        entry["name"] = m.name
        if previous is None:
            entry["inbound_nodes"] = []
        elif keras3:
            entry["inbound_nodes"] = [{"args": [{"class_name": "__keras_tensor__", "config": {
                "shape": [None], "dtype": "float32", "keras_history": [previous, 0, 0]}}],
                "kwargs": {"training": False, "mask": None}}]
        else:
            entry["inbound_nodes"] = [[[previous, 0, 0, {}]]]
        entries.append(entry)
        previous = m.name
    first, last = model.layers[0].name, model.layers[-1].name
    io_refs = ([first, 0, 0], [last, 0, 0]) if keras3 else ([[first, 0, 0]], [[last, 0, 0]])
    return {"class_name": "Functional", "config": {"name": model.name, "trainable": True, "layers": entries,
                                                     "input_layers": io_refs[0], "output_layers": io_refs[1]}}


def tagger():
    lstm.clear_session()
    torch.manual_seed(1)
    model = lstm.Sequential([
        layers.InputLayer(batch_shape=(None, None, 6), name="chars"),
        layers.Masking(0.0),
        layers.Bidirectional(layers.LSTM(5, return_sequences=True), input_shape=(None, 6)),
        layers.LSTM(4, return_sequences=True, input_dim=10),
        layers.Dropout(0.3),
        layers.TimeDistributed(layers.Dense(3, activation="softmax", input_dim=4)),
        layers.Dense(2, input_dim=3),
    ], name="tagger")
    x = torch.randn(4, 7, 6)
    x[1, 5:] = 0.0   # trailing padding
    x[2, :2] = 0.0   # leading padding
    x[3, 3] = 0.0    # a hole
    return model.eval(), x


def gru_and_simple():
    lstm.clear_session()
    torch.manual_seed(2)
    model = lstm.Sequential([
        layers.InputLayer(batch_shape=(None, 9, 3), name="series"),
        layers.GRU(6, return_sequences=True, input_dim=3),
        layers.SimpleRNN(5, input_dim=6),
        layers.Dense(2, input_dim=5),
    ], name="gru_and_simple")
    with torch.no_grad():  # nonzero GRU recurrent bias row, so the [2, 3U] layout matters
        model.layers[1].cell.bias.normal_()
    return model.eval(), torch.randn(3, 9, 3)


def stateful_stream():
    lstm.clear_session()
    torch.manual_seed(3)
    model = lstm.Sequential([
        layers.InputLayer(batch_shape=(1, 1, 4), name="step"),
        layers.LSTM(6, return_sequences=True, stateful=True, input_dim=4),
        layers.Dense(1, input_dim=6),
    ], name="stateful_stream")
    return model.eval(), torch.randn(5, 1, 1, 4)


def expected_outputs(model, x):
    with torch.no_grad():
        if not stateful_layers(model):
            return model(x).numpy()
        model.reset_state()
        out = np.stack([model(x[k]).numpy() for k in range(x.shape[0])])
        model.reset_state()
        return out


FORMATS = ["keras3_zip", "keras3_json_weights", "tf_keras_h5", "keras3_legacy_h5",
           "keras3_zip_functional", "tf_keras_h5_functional"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("build", [tagger, gru_and_simple, stateful_stream], ids=lambda f: f.__name__)
def test_synthetic_model_files(tmp_path, build, fmt):
    model, x = build()
    expected = expected_outputs(model, x)
    functional = fmt.endswith("functional")
    keras3 = fmt.startswith("keras3")
    entry_fn = keras3_entry if keras3 else tf_keras_entry
    if functional:
        top = functional_config(model, entry_fn, keras3)
    else:
        top = {"class_name": "Sequential", "config": {"name": model.name, "trainable": True,
                                                        "layers": [entry_fn(m) for m in model.layers]}}
    if keras3:
        top["module"] = "keras"
    path = tmp_path / f"model.{fmt}"
    weights = None
    if fmt.startswith("keras3_zip"):
        write_keras_zip(path, top, model)
    elif fmt == "keras3_json_weights":
        path.write_text(json.dumps(top))
        weights = tmp_path / "model.weights.h5"
        lstm.save_keras_weights(model, weights)
    else:
        write_legacy_h5(path, top, model, "3.15.1" if keras3 else "2.21.0", functional)
    loaded = lstm.load_keras(path, weights=weights)
    assert [type(m).__name__ for m in loaded.layers] == [type(m).__name__ for m in model.layers]
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        assert np.array_equal(a, b)
    arrays = {"inputs": x.numpy(), "outputs": expected}
    error = run_entry(loaded, arrays, {"atol": 0.0, "rtol": 0.0}, fmt)
    assert error == 0.0


def test_masks_flow_through_the_tagger():
    model, x = tagger()
    out, mask = model(x, return_mask=True)
    assert torch.equal(mask, torch.any(x != 0, dim=-1))
    # inside Bidirectional masked steps output 0, then the second LSTM repeats its last output
    bi = model.layers[2](model.layers[1](x), mask=mask)
    assert torch.all(bi[1, 5:] == 0) and torch.all(bi[3, 3] == 0)


def test_sequential_config_round_trip():
    model, x = tagger()
    again = lstm.Sequential.from_config(model.get_config())
    again.set_weights(model.get_weights())
    again.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_stateful_model_keeps_state_across_calls():
    model, x = stateful_stream()
    with torch.no_grad():
        first = model(x[0])
        model(x[1])
        model.reset_state()
        assert torch.equal(model(x[0]), first)
        assert not torch.equal(model(x[0]), first)


# ----- errors -----------------------------------------------------------------------------------
def test_random_bytes_file(tmp_path):
    path = tmp_path / "random.keras"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a Keras model file"):
        lstm.load_keras(path)


@pytest.mark.parametrize("name", ["sentiment.keras", "sentiment.tf_keras.h5", "sentiment.weights.h5"])
def test_truncated_files(tmp_path, name):
    data = (MODEL_DIRS[-1] / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        if name.endswith(".weights.h5"):
            lstm.load_keras(MODEL_DIRS[-1] / "sentiment.json", weights=path)
        else:
            lstm.load_keras(path)
    assert "h5py" not in type(info.value).__module__
    assert "truncated" in str(info.value) or "cannot read" in str(info.value)


def test_unsupported_layer_is_named(tmp_path):
    top = json.loads((MODEL_DIRS[-1] / "sentiment.json").read_text())
    top["config"]["layers"].insert(2, {"module": "keras.layers", "class_name": "Conv1D",
                                       "config": {"name": "conv1d", "filters": 8, "kernel_size": 3}})
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(top))
    with pytest.raises(ValueError, match=r"conv1d.*Conv1D.*unsupported layer class"):
        lstm.load_keras(path, weights=MODEL_DIRS[-1] / "sentiment.weights.h5")


def test_weights_only_file_and_json_without_weights():
    with pytest.raises(ValueError, match="weights-only"):
        lstm.load_keras(MODEL_DIRS[-1] / "sentiment.weights.h5")
    with pytest.raises(ValueError, match="weights="):
        lstm.load_keras(MODEL_DIRS[-1] / "sentiment.json")


def test_mismatched_weights_name_the_layer(tmp_path):
    top = json.loads((MODEL_DIRS[-1] / "sentiment.json").read_text())
    top["config"]["layers"][2]["config"]["units"] = 32
    path = tmp_path / "smaller.json"
    path.write_text(json.dumps(top))
    with pytest.raises(ValueError, match="'lstm'"):
        lstm.load_keras(path, weights=MODEL_DIRS[-1] / "sentiment.weights.h5")


def test_branching_functional_model_refused(tmp_path):
    model, _ = gru_and_simple()
    top = functional_config(model, keras3_entry, True)
    top["config"]["layers"].append({**keras3_entry(layers.Dense(1, name="side")), "name": "side",
                                    "inbound_nodes": top["config"]["layers"][1]["inbound_nodes"]})
    path = tmp_path / "branch.json"
    path.write_text(json.dumps(top))
    weights = tmp_path / "w.weights.h5"
    lstm.save_keras_weights(model, weights)
    with pytest.raises(ValueError, match="not on the single chain"):
        lstm.load_keras(path, weights=weights)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        lstm.load_keras("/nonexistent/model.keras")
