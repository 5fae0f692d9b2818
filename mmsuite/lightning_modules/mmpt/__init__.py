"""MMPT family: a decoder LM with an extended vocabulary (text, image and audio tokens), LoRA and new rows."""
