"""ComfyUI workflows on the platform: the node set, UI-format → API-format conversion,
validation, compilation into platform jobs, and the durable state of prompts and saved workflows.

HTTP lives in ``api/comfy`` and ``api/workflows``; this package has no web framework in it.
"""

from zimage_platform.workflows.catalog import build_catalog, model_file
from zimage_platform.workflows.compiler import CompiledPrompt, PlannedJob, compile_prompt
from zimage_platform.workflows.nodes import NODES, Catalog, object_info
from zimage_platform.workflows.ui_format import WorkflowFormatError, is_ui_workflow, ui_to_api
from zimage_platform.workflows.validation import PromptRejected

__all__ = [
    "NODES",
    "Catalog",
    "CompiledPrompt",
    "PlannedJob",
    "PromptRejected",
    "WorkflowFormatError",
    "build_catalog",
    "compile_prompt",
    "is_ui_workflow",
    "model_file",
    "object_info",
    "ui_to_api",
]
