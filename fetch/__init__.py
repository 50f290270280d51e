"""Model artifacts fetched into a pod: today a model's tokenizer files alone (`tokenizer.py`),
for the endpoint picker's precise prefix scorer, from Hugging Face (`hf.py`) or S3 (`s3.py`).
Run as an init container: `infergate fetch tokenizer --source URI --dest DIR`."""
