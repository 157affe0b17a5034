"""The whole pipeline, stage by stage (:mod:`.run`), its settings (:mod:`.config`), the optional
conv fine-tuning stage (:mod:`.conv_finetune`) and the book of finished stages (:mod:`.stages`)."""
from .config import (BackboneConfig, ConvFinetuneConfig, DataConfig, FeatureConfig, PipelineConfig, TimingConfig,
                     detector_settings, embedded_default_overrides, pipeline_config, refuse_unused_settings)
from .run import run_pipeline
from .stages import StageBook, stage_key, stage_keys

__all__ = ["BackboneConfig", "ConvFinetuneConfig", "DataConfig", "FeatureConfig", "PipelineConfig", "TimingConfig",
           "detector_settings", "embedded_default_overrides", "pipeline_config", "refuse_unused_settings",
           "run_pipeline", "StageBook", "stage_key", "stage_keys"]
