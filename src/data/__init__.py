"""Data: the JSONL contract, the coord codec, the canonical serializer, the prompt builder, shapes."""
