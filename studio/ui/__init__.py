"""Troupe Studio in the browser (Gradio): subjects, a layered canvas, relations, generation, settings.

    page.py      build_ui (the header, the four tabs, what ties them together), serve, make_studio
    compose.py   the Compose tab: relation, canvas, settings of the image, generate, reuse / save / open
    image_settings.py  the Compose tab's "Settings for this image" card; what a generation costs on ZeroGPU
    references.py  the Compose tab's "References" card: the subjects' photos, image guidance, collage start
    loras.py     the Compose tab's LoRA list: files and scales ↔ LoraRefs
    subjects.py  the Subjects tab: register from photos; rename, export, delete, import, place
    relations.py the Relations tab: teach a relation from example pictures; rename, delete, export, import
    relation_editor.py    its example editor: pictures, prompts, objects, boxes and keypoints set by clicks
    relation_examples.py  the examples' JSON, the picture drawn, the folder Train writes
    settings.py  the "Model & settings" tab: load a model, machine presets
    forms.py     where widgets become a request: one dataclass per form, named as the API's parameters
    jobs.py      readable errors, streamed jobs with cancel, per-session state, the ZeroGPU wrapper
    canvas.py    the layered box editor and its JSON (documented there) ↔ Layout
    views.py     progress bars, subject cards, badges, Markdown
    static/      the canvas editor's JS and CSS, the studio's CSS

Started by `python app.py` or `python -m studio ui`.
"""

from studio.ui.page import build_ui, launch_options, make_studio, serve

__all__ = ["build_ui", "launch_options", "make_studio", "serve"]
