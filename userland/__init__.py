"""llmos.userland"""
