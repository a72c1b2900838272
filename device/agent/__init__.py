"""The kiosk agent: frame loop (capture -> queue -> process), status, event sinks, runner."""

from core.protocol.schemas import decision_record
from device.agent.loop import Agent, AgentError, Analyzer, Loader, Models
from device.agent.sink import EventSink, FanOutSink, JsonLinesSink, LoggingSink, MemorySink
from device.agent.status import AgentStatus

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
