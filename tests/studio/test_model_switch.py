"""Switching models in the "Model & settings" tab keeps the --vae, --embedding and --compile the app was started
with (the tab has no widgets for them; issue 19)."""

from __future__ import annotations

from dataclasses import replace

from engines.types import ModelSpec
from studio.ui.forms import ModelForm
from studio.ui.settings import SettingsTab

STARTED = ModelSpec("demo", vae="/models/vae-ft-mse.safetensors", embeddings=("/models/EasyNegative.safetensors",),
                    compile=True)  # fmt: skip


def test_the_form_keeps_the_options_it_has_no_widgets_for():
    form = replace(ModelForm.from_request(STARTED), source=" other/model ", dtype="fp32")
    spec = form.to_request(STARTED)
    assert (spec.source, spec.dtype) == ("other/model", "fp32")
    assert (spec.vae, spec.embeddings, spec.compile) == (STARTED.vae, STARTED.embeddings, True)
    assert form.to_request() == replace(spec, vae=None, embeddings=(), compile=False)  # no spec: the defaults


class _Studio:
    def __init__(self) -> None:
        self.model_spec, self.loaded = STARTED, []

    def load_model(self, spec: ModelSpec) -> None:
        self.loaded.append(spec)
        self.model_spec = spec

    def model_info(self) -> dict:
        return {"source": self.model_spec.source, "family": "demo", "native_size": 64}


class _Sessions:
    studio = _Studio()


def test_switching_twice_in_the_tab_loads_with_the_started_options():
    tab = object.__new__(SettingsTab)  # the handler alone: no Blocks are built
    tab.sessions, tab.allow_switch, tab.native = _Sessions(), True, 64
    for source in ("a/first", "a/second"):
        list(tab.load_model(replace(ModelForm.from_request(STARTED), source=source), None))
    first, second = _Sessions.studio.loaded
    for spec, source in ((first, "a/first"), (second, "a/second")):
        assert spec == replace(STARTED, source=source)
