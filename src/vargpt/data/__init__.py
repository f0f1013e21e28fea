"""Training data: record formats and validation (``records``), collation into ``VARGPT.forward`` kwargs
(``collate``)."""

from vargpt.data.collate import DPOCollator, EncodedRow, SFTCollator, crop_offsets, generation_target, resize_for_crop
from vargpt.data.records import DPORecord, LoadedRecords, Message, RecordError, SFTRecord, load_records, parse_record

__all__ = ["load_records", "parse_record", "LoadedRecords", "RecordError", "Message", "SFTRecord", "DPORecord",
           "SFTCollator", "DPOCollator", "EncodedRow", "resize_for_crop", "crop_offsets", "generation_target"]
