from guidance.app.job import main

main()
