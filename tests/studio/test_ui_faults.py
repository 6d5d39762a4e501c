"""Out of memory in the middle of a generation, through the studio's API: the visitor reads one clear line, and the
same app serves the next request (the fault is armed in-process by engines/faults.py; the app is served in-process)."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from engines import faults  # noqa: E402
from tests.studio.test_ui_api import gen_args, two_regions  # noqa: E402


def test_out_of_memory_mid_generation_is_one_line_and_the_app_serves_the_next_request(served_studio):
    studio, url = served_studio
    client = Client(url, verbose=False)
    args = gen_args("a red ball next to a blue box", two_regions(), steps=3)
    with faults.armed("generate.step@2:oom"), pytest.raises(AppError) as error:
        client.predict(*args, api_name="/generate")
    message = str(error.value)
    assert message.startswith("out of memory while generating: nothing was saved and the model is still loaded")
    assert "\n" not in message and "Traceback" not in message and "OutOfMemoryError" not in message
    assert "generate.step" not in faults._ARMED  # it fired mid-generation, not before or never
    status, gallery = client.predict(*args, api_name="/generate")  # the next request, same visitor, same model
    assert len(gallery) == 1 and "out of memory" not in str(status)
    other = Client(url, verbose=False)  # and another visitor
    assert len(other.predict(*args, api_name="/generate")[1]) == 1
