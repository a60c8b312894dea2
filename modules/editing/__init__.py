"""Knowledge editing: methods that change specific facts a model holds (LocFT-BF)."""

from zoo.modules.editing.locft_bf import LocFTBFEditor, localized_parameter_name, run_protocol

__all__ = ["LocFTBFEditor", "localized_parameter_name", "run_protocol"]
