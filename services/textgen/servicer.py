"""TextGenService: gRPC in, engine calls, gRPC out. No generation logic here."""

from __future__ import annotations

import json
import logging
import queue

import grpc

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from services.textgen import wire
from services.textgen.guided import Constraints
from services.textgen.loader import ServedModel
from services.textgen.sequences import ERROR, SequenceHandle, SequenceResult, TokenEvent
from shared.errors import Internal, InvalidArgument

logger = logging.getLogger(__name__)


class TextGenServicer(pb_grpc.TextGenServiceServicer):
    def __init__(
        self, served: ServedModel, *, max_prompts: int, max_queue_size: int, max_batch_size: int
    ) -> None:
        self.served = served
        self.engine = served.engine
        self.tok = served.tokenizer
        self.max_prompts = max_prompts
        self.max_queue_size = max_queue_size
        self.max_batch_size = max_batch_size
        self.constraints = Constraints(self.tok, served.model.out_w.shape[0])  # structured output, cached

    def _submit(
        self, request, context: grpc.ServicerContext, sink: queue.SimpleQueue | None = None
    ) -> list[SequenceHandle]:
        reqs = wire.sequence_requests(
            request.prompts,
            request.params,
            self.tok,
            max_prompts=self.max_prompts,
            constraints=self.constraints,
        )
        handles = self.engine.submit(reqs, sink=sink)
        # Fires when the RPC ends for any reason; after a normal finish cancel() is a no-op.
        context.add_callback(lambda: [h.cancel() for h in handles])
        return handles

    @staticmethod
    def _check(r: SequenceResult) -> None:
        if r.finish_reason == ERROR:
            raise Internal(r.error or "generation failed")

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        handles = self._submit(request, context)
        results = [h.result() for h in handles]
        for r in results:
            self._check(r)
        return pb.GenerateResponse(
            completions=[wire.completion(i, r, request.params, self.tok) for i, r in enumerate(results)],
            model=self.served.name,
        )

    def GenerateStream(self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext):
        sink: queue.SimpleQueue = queue.SimpleQueue()
        handles = self._submit(request, context, sink)
        params = request.params
        texts = [wire.StreamText(self.tok, list(params.stopping.stop)) for _ in handles]
        ends, ignore_eos = self.served.engine.tok.ends, params.stopping.ignore_eos
        remaining = len(handles)
        while remaining:
            index, ev = sink.get()
            if isinstance(ev, TokenEvent):
                is_eos = ev.token_id in ends and not ignore_eos
                delta = "" if is_eos else texts[index].push(ev.token_id)
                token = pb.Token(id=ev.token_id, text=self.tok.decode([ev.token_id]))
                if ev.logprob is not None:
                    token.logprob = ev.logprob
                if ev.top is not None:
                    token.top.CopyFrom(wire._top(ev.top, self.tok))
                yield pb.GenerateStreamResponse(index=index, tokens=[token], text=delta)
            else:
                remaining -= 1
                self._check(ev)
                done = wire.completion(index, ev, params, self.tok)
                yield pb.GenerateStreamResponse(
                    index=index, text=texts[index].finish(done.text), finished=True, completion=done
                )

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        if request.texts:
            return pb.TokenizeResponse(
                encoded=[
                    pb.TokenIds(ids=self.tok.encode(t, add_special_tokens=request.add_special_tokens))
                    for t in request.texts
                ]
            )
        ids = self.tok.encode(request.text, add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(ids=ids, tokens=self.tok.token_texts(ids))

    def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.ServicerContext
    ) -> pb.DetokenizeResponse:
        bad = [i for i in request.ids if not 0 <= i < self.tok.vocab_size]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary", field="ids")
        return pb.DetokenizeResponse(text=self.tok.decode(list(request.ids)))

    def ApplyChatTemplate(self, request, context: grpc.ServicerContext) -> pb.ApplyChatTemplateResponse:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if not messages:
            raise InvalidArgument("messages is empty", field="messages")
        tools = None
        if request.tools_json:
            try:
                tools = json.loads(request.tools_json)
            except ValueError:
                raise InvalidArgument("tools is not valid JSON", field="tools") from None
            if not isinstance(tools, list):
                raise InvalidArgument("tools must be a list", field="tools")
        return pb.ApplyChatTemplateResponse(
            prompt=self.tok.apply_chat_template(
                messages, add_generation_prompt=request.add_generation_prompt, tools=tools
            )
        )

    def GetModelInfo(self, request, context: grpc.ServicerContext) -> pb.GetModelInfoResponse:
        s, tok = self.served, self.tok
        return pb.GetModelInfoResponse(
            name=s.name,
            family=s.arch.family,
            architecture=s.arch.architecture,
            dtype=s.dtype,
            device=s.device,
            vocab_size=tok.vocab_size,
            max_context_tokens=s.max_context_tokens,
            max_batch_size=self.max_batch_size,
            max_queue_size=self.max_queue_size,
            max_prompts_per_request=self.max_prompts,
            eos_token=tok.eos_token,
            eos_token_id=tok.eos_id if tok.eos_id is not None else -1,
            bos_token=tok.bos_token,
            bos_token_id=tok.bos_id if tok.bos_id is not None else -1,
            has_chat_template=tok.has_chat_template,
            num_parameters=s.model.num_parameters(),
            source_format=s.source_format,
            chat_template=tok.chat_template,
            batch_invariant=self.engine.cfg.batch_invariant,
            checkpoint_id=s.checkpoint_id,
            tokenizer_id=s.tokenizer_id,
            kv_cache_blocks=self.engine.pool.usable,
            kv_block_size=self.engine.pool.block_size,
            prefix_caching=self.engine.pool.prefix_caching,
        )

    def GetLoad(self, request, context: grpc.ServicerContext) -> pb.GetLoadResponse:
        waiting, running = self.engine.load()
        return pb.GetLoadResponse(
            num_waiting=waiting,
            num_running=running,
            max_batch_size=self.max_batch_size,
            max_queue_size=self.max_queue_size,
        )
