"""llmos.syscalls"""
