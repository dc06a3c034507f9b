"""Interactive client for ``PUT /api``, compatible with Megatron-LM's tools/text_generation_cli.py.

    python tools/text_generation_cli.py localhost:5000

Same loop as Megatron's: a prompt, then the number of tokens to generate, then the prompt plus its
completion. Errors print ``Error <status>: <message>``, as Megatron's CLI does (ours always sends them
with a non-200 status and a JSON ``message``).
"""

import ast
import json
import sys

import requests

if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: text_generation_cli.py HOST:PORT", file=sys.stderr)
        sys.exit(2)
    url = "http://" + sys.argv[1] + "/api"
    headers = {"Content-Type": "application/json"}
    while True:
        try:
            sentence = input("Enter prompt: ")
            tokens_to_generate = ast.literal_eval(input("Enter number of tokens to generate: "))
        except (EOFError, KeyboardInterrupt):
            print()
            break
        except (ValueError, SyntaxError) as e:
            print(f"Error: not a number ({e})")
            continue
        data = {"prompts": [sentence], "tokens_to_generate": tokens_to_generate}
        response = requests.put(url, data=json.dumps(data), headers=headers)
        if response.status_code != 200:
            print(f"Error {response.status_code}: {response.json()['message']}")
        else:
            print("Megatron Response: ")
            print(response.json()["text"][0])
