REGISTER: list = []
