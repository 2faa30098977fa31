"""Lightning callbacks: behaviour you can switch off without changing what a method is."""

from lit_align.callbacks.adversarial_eval import AdversarialEvaluation
from lit_align.callbacks.assessment_report import UnlearningAssessmentReport
from lit_align.callbacks.batch_checkpoint import BatchCheckpoint
from lit_align.callbacks.cpu_threads import CPUThreads
from lit_align.callbacks.debate_report import DebateReport
from lit_align.callbacks.export import HFExport
from lit_align.callbacks.fewl_report import FEWLReport
from lit_align.callbacks.game_report import GameReport
from lit_align.callbacks.predictions import PredictionWriter
from lit_align.callbacks.run_cost import RunCost
from lit_align.callbacks.samples import SampleGenerations
from lit_align.callbacks.summarization_report import SummarizationReport
from lit_align.callbacks.unlearning_eval import UnlearningEvaluation
from lit_align.callbacks.watermark_eval import WatermarkEvaluation
from lit_align.callbacks.weight_mask import WeightMask

__all__ = ["AdversarialEvaluation", "BatchCheckpoint", "CPUThreads", "DebateReport", "FEWLReport", "GameReport", "HFExport", "PredictionWriter", "RunCost", "SampleGenerations", "SummarizationReport", "UnlearningAssessmentReport", "UnlearningEvaluation", "WatermarkEvaluation", "WeightMask"]
