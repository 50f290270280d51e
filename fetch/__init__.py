"""Model artifacts fetched into a pod or onto this machine: a model's tokenizer files alone
(`tokenizer.py`: `infergate fetch tokenizer --source URI --dest DIR`, the endpoint picker's
init container) and its weights (`download.py`: `infergate download URI --dest PATH`, the
engine's init container and standalone mode), from Hugging Face (`hf.py`), S3 (`s3.py`), a
local folder or mounted claim (`local.py`) or an HTTP(S) archive (`archive.py`)."""
