"""The kiosk agent: frame loop (capture -> queue -> process), status, event sinks, runner."""

from core.protocol.schemas import decision_record
from device.agent.loop import Agent, AgentError, Loader
from device.agent.sink import EventSink, FanOutSink, JsonLinesSink, LoggingSink, MemorySink
from device.agent.status import AgentStatus
from device.pipeline.frame import Analyzer, Models

__all__ = [
    "Agent",
    "AgentError",
    "AgentStatus",
    "Analyzer",
    "EventSink",
    "FanOutSink",
    "JsonLinesSink",
    "Loader",
    "LoggingSink",
    "MemorySink",
    "Models",
    "decision_record",
]
