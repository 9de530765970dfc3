"""Communication scheduling (after ByteScheduler): the priority queue and, later, the policies."""

from legato.core.scheduler.queue import (
    NATIVE_AVAILABLE,
    PythonPriorityQueue,
    QueueClosed,
    Task,
    make_queue,
)

__all__ = ["NATIVE_AVAILABLE", "PythonPriorityQueue", "QueueClosed", "Task", "make_queue"]
