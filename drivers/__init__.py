"""llmos.drivers"""
